"""fastalign: fast kernels and engines for aligning language models without RLHF."""
