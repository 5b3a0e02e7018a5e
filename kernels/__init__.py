"""Triton kernels of fastalign, one file per kernel family, installed as `fastalign.kernels`.

Each module holds the @triton.jit kernels and the host-side launchers that the ops in
`fastalign.ops` dispatch to. Importing a module here requires triton.
"""
