"""Shared benchmark plumbing: timing, peak memory, device and commit identification, table and JSON output.

Every bench/ script measures its candidates in one run, prints a table and writes
bench/results/<name>-<device>-<commit>.json (<device>: device_slug, the GPU or the CPU model), so that each claim in
the README or an issue note traces back to a committed measurement on a named device.
"""
import argparse
import gc
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

# bench/results/, or FASTALIGN_BENCH_RESULTS (the smoke tests write there, not into the checkout)
RESULTS_DIR = os.environ.get("FASTALIGN_BENCH_RESULTS") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                          "results")

# Llama-architecture shapes of the GPU benchmarks, built with random weights (speed and memory do not depend
# on the values): keyword arguments of transformers.LlamaConfig.
LLAMA_SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,  # Llama-3.2-1B
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
               tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,  # Llama-3-8B
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
               tie_word_embeddings=False),
}


def qwen3_5_layer_types(num_layers):
    """Qwen3.5's hybrid pattern over `num_layers` layers: three Gated DeltaNet (linear attention) layers to one of full
    attention, the last of each four, counted from the top (a tiny model of 2 layers has one of each)."""
    return ["full_attention" if (num_layers - 1 - i) % 4 == 0 else "linear_attention" for i in range(num_layers)]


# where Linux names the CPU's model (platform.processor() is '' or the architecture there)
CPUINFO = "/proc/cpuinfo"


def device_name(device):
    """A record's device: the GPU's name, the CPU's model with the threads torch uses, another accelerator's type."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"
    return device.type  # another accelerator (mps, xpu, ...): named by its type, never taken for the CPU


def device_slug(device):
    """The device in a record's file name: the GPU's name, or "cpu-" and the CPU's model without trademarks, clock,
    "CPU", "Processor" and core count ("cpu-amd-epyc-7b13"), so that two CPUs' runs at one commit are two files."""
    name = device_name(device).split(" (")[0]
    if torch.device(device).type == "cpu":
        name += " " + re.sub(r"\((R|TM)\)|@.*|\b(CPU|Processor|\d+-Core)\b", " ", cpu_model(), flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def cpu_model():
    """The CPU's "model name" of /proc/cpuinfo, else (no such file or line: another system, ARM) platform's name."""
    try:
        with open(CPUINFO) as f:
            names = [value.strip() for key, _, value in (line.partition(":") for line in f)
                     if key.strip() == "model name" and value.strip()]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def changed_files(sums_path, root):
    """The files listed in sums_path (sha256sum's output, paths relative to root) that are missing or whose content
    differs from the listed digest."""
    changed = []
    with open(sums_path) as f:
        for line in f:
            digest, path = line.rstrip("\n").split("  ", 1)
            try:
                with open(os.path.join(root, path), "rb") as g:
                    same = hashlib.sha256(g.read()).hexdigest() == digest
            except OSError:
                same = False
            if not same:
                changed.append(path)
    return changed


def git_commit():
    """The checkout's short commit (-dirty with uncommitted changes); FASTALIGN_COMMIT where a copy of the
    tree runs without its .git (bench/gpu_session.sh sets it), else "unknown". FASTALIGN_COMMIT_SUMS, the
    tracked files' digests recorded with FASTALIGN_COMMIT (gpu_session.sh --prepare), adds -stale when the tree
    that runs differs from them: a results file never names a commit whose code it did not measure."""
    if os.environ.get("FASTALIGN_COMMIT"):
        sums = os.environ.get("FASTALIGN_COMMIT_SUMS")
        stale = sums and changed_files(sums, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return os.environ["FASTALIGN_COMMIT"] + ("-stale" if stale else "")
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, *, warmup=2, reps=5):
    """Median wall time of fn() in milliseconds, after warm-up; synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def device_busy_ms(fn, device):
    """Milliseconds the GPU spends running kernels (and copies) during one fn() call, summed from the profiler's
    device events; None off CUDA (fn not run). Against the call's wall time (median_ms) it says whether the GPU
    waits for the host: a loop of small launches (the chunked backward's) is bound by Python where this falls well
    short of the wall time."""
    if torch.device(device).type != "cuda":
        return None
    synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        fn()
        synchronize(device)
    return sum(event.self_device_time_total for event in profiler.key_averages()) / 1e3


def autotuned_configs():
    """The launch configuration that each of fastalign's autotuned Triton kernels chose so far in this process, by
    kernel ("module.kernel") and tuning key (the key's values, dtypes included, as text): which tile shapes win on
    the device a record was measured on, the starting point of the next tuning. Empty without Triton, and under
    the interpreter, whose one configuration per kernel is never tuned."""
    autotuner = sys.modules.get("triton.runtime.autotuner")
    if autotuner is None:
        return {}
    chosen = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("fastalign.kernels."):
            continue
        for name, value in vars(module).items():
            if isinstance(value, autotuner.Autotuner) and value.cache:
                short = module_name.rsplit(".", 1)[1]
                chosen[f"{short}.{name}"] = {
                    ", ".join(map(str, key)): {**config.kwargs, "num_warps": config.num_warps,
                                               "num_stages": config.num_stages}
                    for key, config in value.cache.items()}
    return chosen


def peak_extra_mib(fn, device):
    """Peak memory allocated by one fn() call beyond what was allocated before it: on CUDA the caching allocator's
    count; on a CPU, whose allocator keeps no count, the highest sum of the allocations less the frees that the
    profiler records during the call, in their order; None on other devices (fn not run). fn must not free what
    existed before it (e.g. gradients of a previous step: set them to None first): on CUDA that free would lower the
    peak, and on a CPU it would or would not, as the block was allocated under an earlier profile or not."""
    kind = torch.device(device).type
    if kind == "cpu":
        return _cpu_peak_extra_mib(fn)
    if kind != "cuda":
        return None
    synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def _cpu_peak_extra_mib(fn):
    """peak_extra_mib on a CPU: the profiler's memory events of one fn() call (each allocation's bytes, and each free's
    as negative bytes), summed in time order."""
    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    changes = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak / 2 ** 20


def _storage_address(t):
    """Where `t`'s storage lies, or None for a tensor without one (a fake, sparse or meta tensor of another test)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def held_for_backward_mib(fn):
    """MiB of the storages of tensors that autograd keeps for the backward while one fn() call runs, each counted
    once, those that existed before the call aside (parameters, optimizer state, a cached reference, the batch): the
    activation memory of a training step, which fusing changes, counted the same way on any device, a CPU too."""
    gc.collect()
    # the type, not isinstance: that would read __class__ of every object, some of which warn or fail
    before = {_storage_address(o) for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}
    held = {}

    def pack(t):
        address = _storage_address(t)
        if address is not None and address not in before:
            held[address] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(held.values()) / 2 ** 20


PROFILE_COLUMNS = [("op", "operator / kernel", "{}"), ("calls", "calls", "{}"), ("self_ms", "self ms", "{:.2f}"),
                   ("self_host_ms", "host ms", "{:.2f}")]   # of profile_top's rows
PYTHON_PROFILE_COLUMNS = [("function", "function", "{}"), ("calls", "calls", "{}"), ("self_s", "self s", "{:.3f}"),
                          ("cumulative_s", "cumulative s", "{:.3f}")]   # of python_profile_top's rows


def profile_top(fn, device, count=12, by="device"):
    """The `count` operators (and kernels, on CUDA) that one fn() call spent most time in, by self time on the device
    (by="device"; on the host where there is no device) or on the host (by="host"), as a list of {"op", "calls",
    "self_ms", "self_host_ms"}: where a row's time goes, for a run to read without a profiler of its own."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        synchronize(device)
    key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    order = key if by == "device" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, order), reverse=True)[:count]
    return [{"op": e.key[:120], "calls": e.count, "self_ms": getattr(e, key) / 1e3,
             "self_host_ms": e.self_cpu_time_total / 1e3} for e in events]


def python_profile_top(fn, count=15):
    """The `count` Python functions one fn() call spent most of its own time in (cProfile's tottime), as a list of
    {"function", "calls", "self_s", "cumulative_s"}: the host work between the operators that profile_top lists."""
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    stats = pstats.Stats(profiler).stats   # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    top = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:count]
    return [{"function": f"{os.path.basename(file)}:{line}:{name}"[:120], "calls": calls, "self_s": tottime,
             "cumulative_s": cumtime} for (file, line, name), (calls, _, tottime, cumtime, _) in top]


# torch operators that only make a view or an alias, or allocate: no kernel
_NO_KERNEL_OPS = {"view", "_unsafe_view", "as_strided", "slice", "select", "transpose", "t", "unsqueeze", "squeeze",
                  "expand", "detach", "alias", "permute", "_reshape_alias", "reshape", "split", "unbind", "lift_fresh",
                  "empty", "empty_like", "empty_strided", "new_empty"}


def kernels_of_call(fn):
    """(torch operators, Triton launches) that one fn() call dispatches: the kernels a forward bound by launches pays
    for, one by one. Views and allocations are no kernel and not counted, nor are the operators the interpreter runs
    inside a Triton launch on the CPU (TRITON_INTERPRET=1), where such a count stands for a GPU's."""
    from torch.utils._python_dispatch import TorchDispatchMode
    counts = {"torch": 0, "triton": 0, "inside": False}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._overloadpacket.__name__ not in _NO_KERNEL_OPS and not counts["inside"]:
                counts["torch"] += 1
            return func(*args, **(kwargs or {}))

    try:
        from fastalign.ops.backend import triton_launch_method
        launcher, method = triton_launch_method()
    except ImportError:   # no triton: no launch to count
        launcher = method = None
    original = getattr(launcher, method) if launcher else None

    def launch(self, *args, **kwargs):
        counts["triton"] += 1
        counts["inside"] = True
        try:
            return original(self, *args, **kwargs)
        finally:
            counts["inside"] = False
    if launcher:
        setattr(launcher, method, launch)
    try:
        with Count():
            fn()
    finally:
        if launcher:
            setattr(launcher, method, original)
    return counts["torch"], counts["triton"]


def optional(factory, unavailable):
    """factory() (a baseline's loss function), or None when its package is missing or fails to load; the error is
    then recorded as unavailable[factory's name]."""
    try:
        return factory()
    except Exception as err:  # ImportError, or a package that imports but does not work with this torch/triton
        unavailable[factory.__name__] = f"{type(err).__name__}: {err}"[:300]
        print(f"skipped: {factory.__name__} ({unavailable[factory.__name__]})")
        return None


def gradients_difference(grads, reference):
    """The largest ||g - r|| / ||r|| (L2, in fp32) over pairs of gradients; a gradient missing from one side (None)
    counts as zeros, a difference of 1."""
    def norm(t):
        return torch.linalg.vector_norm(t, dtype=torch.float32)
    return max(float(g is not r) if g is None or r is None else float(norm(g - r) / norm(r).clamp(min=1e-30))
               for g, r in zip(grads, reference))


def count_at_least(minimum):
    """An argparse type for a count, size or repetition option: an integer >= minimum, so that 0 or -1 is a usage
    error naming the option, not an error row or a NaN in the table."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def device_argument(text):
    """An argparse type for --device: a torch device this machine has, so that --device cuda without CUDA is a usage
    error naming the option, not an AssertionError from inside torch."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu or cuda, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (torch {torch.__version__})")
    return text


def failure_row(method, err):
    """The table row of a method that raised `err`, so that one failing method does not lose the others' rows."""
    if isinstance(err, torch.OutOfMemoryError):
        return {"method": method, "error": "out of memory"}
    return {"method": method, "error": f"{type(err).__name__}: {err}"[:300]}


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


# the packages a bench compares with, by module name -> distribution name
COMPARED_PACKAGES = {"transformers": "transformers", "liger_kernel": "liger-kernel",
                     "cut_cross_entropy": "cut-cross-entropy", "trl": "trl", "torchao": "torchao"}


def compared_versions():
    """{distribution: version} of the compared packages this process imported: what the record's rows ran (a package
    imported from a checkout without its distribution's metadata: its __version__, else None)."""
    def version(module, dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return getattr(sys.modules[module], "__version__", None)
    return {dist: version(module, dist) for module, dist in COMPARED_PACKAGES.items()
            if sys.modules.get(module) is not None}


def installed_version(dist):
    """The version of the installed distribution `dist`, or None: Triton's is recorded whether or not the run imported
    it (a CPU run on the torch path does not), since it is part of the environment the record names."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_results(name, device, config, rows, tag=None, quick=False):
    """Writes the JSON record of one run and returns its path (its name ends in `tag` where given: a variant of the
    benchmark, kept beside its default run of the same commit; then in "quick" for a --quick smoke run, which so
    never replaces a measured record)."""
    commit = git_commit()
    record = {"benchmark": name, "device": device_name(device), "commit": commit, "torch": torch.__version__,
              "triton": installed_version("triton"), "packages": compared_versions(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": config,
              "autotuned": autotuned_configs(), "results": rows}
    os.makedirs(RESULTS_DIR, exist_ok=True)
    tags = "".join(f"-{t}" for t in (tag, "quick" if quick else None) if t)
    path = os.path.join(RESULTS_DIR, f"{name}-{device_slug(device)}-{commit}{tags}.json")
    # written aside, then renamed over the record: a run killed at its time limit while writing (the benches rewrite
    # their record after each row) leaves the previous record whole, not a truncated file
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(partial, path)
    return path
