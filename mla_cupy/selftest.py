"""Self-test on this machine's GPU: ``python -m mla_cupy.selftest [--kernels LIST] [--seed N]
[--iters N]``.

For each kernel family the GPU runs (``_select.FAMILIES``: ``sm90`` on compute capability 9.0,
``portable`` everywhere), forced in turn as ``MLA_CUPY_KERNEL`` would force it, it

* compiles (or loads from the disk cache) what the decode problems below need, with
  :func:`mla_cupy.warmup`, and reports how long that took;
* runs each case of :data:`CASES` (bfloat16 and float16, ``s_q`` 1 and 2, ``h_q`` 16 and 128,
  64-token pages, variable-length batches with empty and one-token requests, NaN in every KV
  slot past a request's end and in unused blocks, a batch larger than the GPU's SM count)
  through ``get_mla_metadata`` and ``flash_mla_with_kvcache``, and checks the result against
  the float64 reference with the numerical contract (:func:`mla_cupy.testing.compare_mla`),
  the GPU's schedule against its host twin (:func:`mla_cupy.scheduler.schedule`), and that
  repeated calls give identical bits; it reports the time of the first call and of later ones.

Output: a header (versions of mla_cupy, CuPy and NVRTC; the GPU, its compute capability and
the driver; the kernel family a DeepSeek decode step gets; the kernel cache directory), then
one verdict line per check, ``PASS``, ``FAIL`` or ``SKIP`` first, then the family and what was
checked (one ``load`` line per family, one line per case), and a summary line. Inputs are drawn
from a fixed seed (``--seed``), so a run is reproducible.

Exit status: 0 when every check passed, 1 when one failed, 2 when no GPU can be used (one
line on stderr says why: no CuPy, no NVIDIA driver or GPU, a driver too old for CuPy, a GPU
older than compute capability 8.0).

Only the standard library and NumPy are imported at module level; CuPy once a GPU is known to
be usable.
"""

import argparse
import dataclasses
import re
import sys
import time

import numpy as np

from ._env import KERNEL_KINDS

__all__ = ["CASES", "main"]

# Kernel families that can be forced (every kind but "auto").
FAMILY_NAMES = tuple(k for k in KERNEL_KINDS if k != "auto")
VERDICTS = ("PASS", "FAIL", "SKIP")
DEFAULT_ITERS = 20
DEFAULT_SEED = 0
# What the header reports the selected kernel family for: a DeepSeek V3 decode step.
DEEPSEEK_PROBLEM = dict(dtype="bfloat16", head_dim=576, head_dim_v=512, m=128, page_block_size=64)

_SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One decode problem of the self-test (inputs from :func:`mla_cupy.testing.make_decode_inputs`).

    ``seqlens`` fixes every request's length; without it the lengths are drawn around
    ``mean_seqlen`` (``varlen``).
    """

    dtype: str
    batch: int
    s_q: int
    h_q: int
    causal: bool
    seqlens: tuple = None
    mean_seqlen: int = 0
    h_kv: int = 1
    head_dim: int = 576
    head_dim_v: int = 512
    page_block_size: int = 64

    @property
    def rows(self):
        """Query rows per KV head (``num_q_tokens_per_head_k``)."""
        return self.s_q * self.h_q // self.h_kv

    @property
    def name(self):
        lengths = (f"seqlens {','.join(map(str, self.seqlens))}" if self.seqlens is not None
                   else f"varlen ~{self.mean_seqlen}")
        dims = "" if (self.head_dim, self.head_dim_v) == (576, 512) else f" d={self.head_dim}/{self.head_dim_v}"
        kv = "" if self.h_kv == 1 else f" h_kv={self.h_kv}"
        return (f"{_SHORT_DTYPE[self.dtype]} b={self.batch} s_q={self.s_q} h_q={self.h_q}{kv}{dims} "
                f"page={self.page_block_size} {'causal' if self.causal else 'non-causal'} {lengths}")

    def inputs(self, seed):
        from .testing import make_decode_inputs

        return make_decode_inputs(self.batch, self.s_q, self.h_q, h_kv=self.h_kv,
                                  head_dim=self.head_dim, head_dim_v=self.head_dim_v,
                                  page_block_size=self.page_block_size, seqlens=self.seqlens,
                                  mean_seqlen=self.mean_seqlen or 1, varlen=self.seqlens is None,
                                  dtype=self.dtype, seed=seed)


# Every length here that is not a multiple of 64 leaves a NaN-poisoned tail in its last page
# (make_decode_inputs poisons every slot past a request's end and every unused block).
CASES = (
    Case("bfloat16", 4, 1, 128, True, seqlens=(1000, 2047, 64, 3001)),
    # An empty request and a one-token one: with s_q = 2 and causal, rows that see no key
    # (out 0, lse +inf).
    Case("bfloat16", 8, 2, 16, True, seqlens=(0, 1, 65, 700, 1300, 2100, 2900, 4097)),
    Case("float16", 8, 1, 16, False, mean_seqlen=1500),
    Case("float16", 2, 2, 128, True, seqlens=(1500, 3333)),
    # More requests than an H200 has SMs.
    Case("bfloat16", 150, 1, 16, True, mean_seqlen=256),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mla_cupy.selftest",
        description="Check mla_cupy on this GPU: compile the kernels, run a few decode problems "
                    "against the float64 reference, once per kernel family the GPU runs.")
    p.add_argument("--kernels", metavar="LIST", default=None,
                   help=f"comma-separated kernel families to check, among {', '.join(FAMILY_NAMES)} "
                        "(default: every family this GPU runs)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the random inputs (default {DEFAULT_SEED})")
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS,
                   help=f"calls timed per case after the checked one (default {DEFAULT_ITERS})")
    args = p.parse_args(argv)
    if args.kernels is not None:
        names = tuple(n.strip() for n in args.kernels.split(",") if n.strip())
        bad = [n for n in names if n not in FAMILY_NAMES]
        if bad or not names:
            p.error(f"--kernels: expected names among {', '.join(FAMILY_NAMES)}, got {args.kernels!r}")
        args.kernels = tuple(dict.fromkeys(names))
    if args.iters < 1:
        p.error(f"--iters: expected a positive count, got {args.iters}")
    if args.seed < 0:
        p.error(f"--seed: expected a non-negative int, got {args.seed}")
    return args


def verdict_line(verdict, family, what, detail):
    """``PASS portable  <what>: <detail>``: the form of every check's line."""
    return f"{verdict} {family:<9} {what}: {detail}"


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def parse_driver_release(text):
    """The release number (e.g. "580.159.04") in the text of /proc/driver/nvidia/version, or None."""
    match = re.search(r"Kernel Module\b.*?\s(\d+\.\d+(?:\.\d+)?)(?:\s|$)", text)
    return match.group(1) if match else None


def _driver_release():
    """The NVIDIA kernel driver's release, where Linux tells it, else None."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8", errors="replace") as f:
            return parse_driver_release(f.read())
    except OSError:
        return None


def _cuda_version(value):
    return f"{value // 1000}.{value % 1000 // 10}"


def header_lines(device_id):
    """The header: versions, the GPU, the driver, the kernel family picked, the cache dir."""
    import cupy

    from . import _compile, _launch, _select
    from ._env import CONFIG
    from ._version import __version__

    lines = [f"mla_cupy selftest: mla_cupy {__version__} (kernel sources sha256 "
             f"{_compile.source_digest()[:16]})"]
    try:
        nvrtc = "NVRTC %d.%d" % _compile.nvrtc_version()
    except Exception as exc:  # noqa: BLE001 - reported; the load checks will fail and say why
        nvrtc = f"NVRTC unavailable ({_first_line(exc)})"
    lines.append(f"CuPy {cupy.__version__}, {nvrtc}, CUDA runtime "
                 f"{_cuda_version(cupy.cuda.runtime.runtimeGetVersion())}")
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    info = _launch.device_info(device_id)
    release = _driver_release()
    driver = f"NVIDIA driver {release}, " if release else "NVIDIA driver "
    lines.append(f"GPU {device_id}: {name}, compute capability {info.cc // 10}.{info.cc % 10}, "
                 f"{info.sms} SMs; {driver}CUDA {_cuda_version(cupy.cuda.runtime.driverGetVersion())}")
    p = DEEPSEEK_PROBLEM
    try:
        picked = _select.decode_choice(device_id, p["dtype"], p["head_dim"], p["head_dim_v"], p["m"],
                                       p["page_block_size"]).family.NAME
    except Exception as exc:  # noqa: BLE001 - e.g. a forced family this GPU cannot run
        picked = f"none ({_first_line(exc)})"
    lines.append(f"kernel family selected: {picked} (MLA_CUPY_KERNEL={CONFIG.kernel}; for a DeepSeek V3 "
                 f"decode step: {_SHORT_DTYPE[p['dtype']]}, d={p['head_dim']}/{p['head_dim_v']}, "
                 f"{p['m']} query rows per KV head, page {p['page_block_size']})")
    lines.append(f"kernel cache: {_compile.cache_location()}")
    return lines


def family_support(device_id):
    """``[(family module, "" or why the GPU cannot run it)]`` for every family, fastest first."""
    from . import _launch, _select

    device = _launch.device_info(device_id)
    p = DEEPSEEK_PROBLEM
    problem = _select.Problem(p["dtype"], p["head_dim"], p["head_dim_v"], p["m"], p["page_block_size"])
    out = []
    for family in _select.FAMILIES:
        ok = family.supports(device, problem) is not None
        out.append((family, "" if ok else family.why_not(device, problem)))
    return out


def case_support(family, device_id, case):
    """"" when `family` runs `case` on the device, else why not."""
    from . import _launch, _select

    device = _launch.device_info(device_id)
    problem = _select.Problem(case.dtype, case.head_dim, case.head_dim_v, case.rows, case.page_block_size)
    return "" if family.supports(device, problem) is not None else family.why_not(device, problem)


class _Prepared:
    """One case's host inputs, their float64 reference and their copies on the GPU."""

    def __init__(self, case, seed):
        import cupy

        from .reference import flash_mla_with_kvcache_reference

        self.case = case
        self.host = case.inputs(seed)
        h = self.host
        self.ref = flash_mla_with_kvcache_reference(h.q, h.k_cache, h.block_table, h.cache_seqlens,
                                                    h.head_dim_v, causal=case.causal)
        self.dev = tuple(cupy.asarray(x) for x in (h.q, h.k_cache, h.block_table, h.cache_seqlens))


def _current_device():
    import cupy

    return cupy.cuda.Device().id


def _bits(x):
    import cupy

    return x.view(cupy.uint16 if x.dtype.itemsize == 2 else cupy.uint32)


def _per_call_us(fn, iters):
    """Microseconds per call of `fn` over `iters` back-to-back calls, between CUDA events on the
    current stream (the host's enqueue rate where it is slower than the GPU)."""
    import cupy

    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) * 1e3 / iters


def check_case(family_name, device_id, prepared, iters):
    """Run one case with `family_name` forced; return (passed, detail, extra lines)."""
    import cupy

    from . import _select
    from .interface import flash_mla_with_kvcache, get_mla_metadata
    from .scheduler import schedule
    from .testing import compare_mla

    case, host = prepared.case, prepared.host
    q, k_cache, block_table, seqlens = prepared.dev
    out = cupy.empty((case.batch, case.s_q, case.h_q, case.head_dim_v), dtype=q.dtype)
    lse = cupy.empty((case.batch, case.h_q, case.s_q), dtype=np.float32)
    _bits(out).fill(0xFFFF)  # NaN in bfloat16 and float16: every value must be written
    lse.fill(np.nan)
    stream = cupy.cuda.get_current_stream()

    def metadata():
        return get_mla_metadata(seqlens, case.rows, case.h_kv, case.h_q)

    with _select.forced(family_name):
        stream.synchronize()
        t0 = time.perf_counter()
        sched, splits = metadata()

        def decode():
            flash_mla_with_kvcache(q, k_cache, block_table, seqlens, case.head_dim_v, sched, splits,
                                   causal=case.causal, out=out, lse=lse)

        decode()
        stream.synchronize()
        first_ms = (time.perf_counter() - t0) * 1e3
        report = compare_mla(out, lse, *prepared.ref, std=host.std)
        parts = _select.sm_parts(device_id, case.rows, case.h_kv)
        want_sched, want_splits = schedule(host.cache_seqlens, parts)
        schedule_ok = (np.array_equal(sched.get(), want_sched) and np.array_equal(splits.get(), want_splits))
        first_out, first_lse = _bits(out).copy(), _bits(lse).copy()
        meta_us = _per_call_us(metadata, iters)
        decode_us = _per_call_us(decode, iters)
        repeat_ok = bool(cupy.array_equal(_bits(out), first_out)) and bool(cupy.array_equal(_bits(lse), first_lse))

    failures = list(report.failures)
    if not schedule_ok:
        failures.append(f"the GPU's schedule ({parts} parts) differs from mla_cupy.scheduler.schedule")
    if not repeat_ok:
        failures.append(f"{iters} repeated calls did not reproduce the first call's bits")
    detail = (f"out max|err| {report.out_max_abs_error:.1e} (cos diff {report.out_cos_diff:.1e}), "
              f"lse max|err| {report.lse_max_abs_error:.1e}; first call {first_ms:.1f} ms, "
              f"decode {decode_us:.1f} us/call, metadata {meta_us:.1f} us/call")
    extra = []
    if failures:
        detail = "; ".join(failures) + "; " + detail
        extra = [f"    inputs: seed {host.seed}"]
        if not report.passed:
            extra += ["    " + line for line in str(report).splitlines()]
    return not failures, detail, extra


def load_family(family_name, device_id, cases):
    """Compile or load the kernels `cases` need with `family_name` forced; return (seconds, modules)."""
    from . import _select
    from .interface import warmup

    with _select.forced(family_name):
        t0 = time.perf_counter()
        seconds = warmup(head_dims=sorted({(c.head_dim, c.head_dim_v) for c in cases}),
                         dtypes=sorted({c.dtype for c in cases}),
                         num_q_tokens_per_head_k=sorted({c.rows for c in cases}), device=device_id)
    return time.perf_counter() - t0, seconds


def run(args, emit=print):
    """The self-test proper (a usable GPU is known to be there); returns the exit status."""
    t_start = time.perf_counter()
    device_id = _current_device()
    for line in header_lines(device_id):
        emit(line)

    support = family_support(device_id)
    by_name = {family.NAME: (family, why) for family, why in support}
    runnable = [family.NAME for family, why in support if not why]
    for family, why in support:
        if why:
            emit(f"kernel family {family.NAME}: not run by this GPU ({why})")
    wanted = list(args.kernels) if args.kernels else runnable
    emit(f"checking kernel families: {', '.join(wanted) or 'none'}; {len(CASES)} cases each (h_kv 1 and "
         f"d=576/512 unless a case says otherwise), seed {args.seed}")

    t0 = time.perf_counter()
    prepared = [_Prepared(case, args.seed + i) for i, case in enumerate(CASES)]
    reference_s = time.perf_counter() - t0

    counts = {v: 0 for v in VERDICTS}
    loading_s = 0.0

    def verdict(v, family, what, detail, extra=()):
        counts[v] += 1
        emit(verdict_line(v, family, what, detail))
        for line in extra:
            emit(line)

    if not wanted:
        verdict("FAIL", "-", "kernel families", "this GPU runs none of " + ", ".join(by_name))
    for name in wanted:
        family, why = by_name[name]
        if why:
            verdict("FAIL", name, "load", f"this GPU cannot run the {name} kernel family: {why}")
            continue
        try:
            seconds, modules = load_family(name, device_id, CASES)
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            verdict("FAIL", name, "load", _first_line(exc),
                    ["    " + line for line in str(exc).splitlines()[1:41]])
            for p in prepared:
                verdict("FAIL", name, p.case.name, "not run: the kernels did not load")
            continue
        loading_s += seconds
        verdict("PASS", name, "load", f"{len(modules)} kernel modules compiled or loaded from the cache "
                                      f"in {seconds:.2f} s")
        for p in prepared:
            why_case = case_support(family, device_id, p.case)
            if why_case:
                verdict("SKIP", name, p.case.name, why_case)
                continue
            try:
                ok, detail, extra = check_case(name, device_id, p, args.iters)
            except Exception as exc:  # noqa: BLE001 - reported as a failed check
                ok, detail, extra = False, _first_line(exc), [f"    inputs: seed {p.host.seed}"]
            verdict("PASS" if ok else "FAIL", name, p.case.name, detail, extra)

    total = counts["PASS"] + counts["FAIL"]
    elapsed = time.perf_counter() - t_start
    skipped = f", {counts['SKIP']} skipped" if counts["SKIP"] else ""
    outcome = f"all {total} checks passed" if not counts["FAIL"] else f"{counts['FAIL']} of {total} checks FAILED"
    emit(f"selftest: {outcome}{skipped} ({elapsed:.1f} s in all: {loading_s:.1f} s compiling or loading kernels, "
         f"{reference_s:.1f} s making inputs and the float64 reference)")
    return 1 if counts["FAIL"] else 0


def main(argv=None):
    args = parse_args(argv)
    from .testing import gpu_status

    ok, reason = gpu_status()
    if not ok:  # one line, no traceback
        print(f"python -m mla_cupy.selftest: no usable GPU: {reason}", file=sys.stderr, flush=True)
        return 2
    return run(args, emit=lambda line: print(line, flush=True))


if __name__ == "__main__":
    sys.exit(main())
