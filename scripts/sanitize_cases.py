"""Small decode problems at the edges, one call of each per kernel family, for compute-sanitizer.

``bash scripts/sanitize.sh`` runs this under memcheck (with leak checking), racecheck, synccheck
and initcheck; it can also run alone, as a quick check of the same cases against the float64
reference. Every case launches the scheduler (``get_mla_metadata``, compared with its NumPy
twin), a decode family's kernel and the combine, on a stream of its own, and compares the result
with ``mla_cupy.reference``. The cases: pages of 1, 16, 64 and 256 tokens, sequences of 0 and 1
token, last pages partly filled, block-table tails of -1, 2^31 - 1 and the test sentinel past
each sequence's last page (and extra columns of them), ``s_q`` > 1 causal with sequences
shorter than ``s_q``, a batch with no tokens at all, one sequence split over every SM, two KV
heads, bfloat16 and float16.

Each case runs once per kernel family (``--kinds``, default ``portable,sm90``, forced as
``MLA_CUPY_KERNEL`` would); a case the forced family does not take (the sm90 family takes no
page of 1 token, and no GPU but compute capability 9.0) is listed as skipped, with the reason.

For the sanitizer's sake: CuPy's memory pools are switched off first, so every array is its own
``cudaMalloc`` (initcheck sees fresh memory, leak checking sees every free), everything is freed
at the end, and the device is reset before the process exits, so that leak checking sees the
context go.

Usage (repo root, GPU machine): PYTHONPATH=. python3 scripts/sanitize_cases.py [--kinds portable]
[--cases NAME,...] [--list]. Exit status 0 when every case that ran matched the reference, 1
otherwise, 2 without a usable GPU.
"""

import argparse
import dataclasses
import gc
import os
import sys
import traceback

import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    seqlens: tuple
    page: int = 64
    s_q: int = 1
    h_q: int = 16
    h_kv: int = 1
    dtype: str = "bfloat16"
    causal: bool = False
    tails: tuple = ()  # block-table value past the last page, per row (default: the test sentinel)
    extra_columns: int = 0  # columns of -1 appended to the block table

    def __str__(self):
        tails = f", tails {self.tails}" if self.tails else ""
        extra = f", {self.extra_columns} extra columns of -1" if self.extra_columns else ""
        return (f"seqlens {list(self.seqlens)}, page {self.page}, s_q {self.s_q}, h_q {self.h_q}, h_kv {self.h_kv}, "
                f"{self.dtype}{', causal' if self.causal else ''}{tails}{extra}")


CASES = (
    Case("page64-edges", (0, 1, 337, 2500)),
    Case("page64-edges-fp16-causal", (0, 1, 337, 2500), dtype="float16", causal=True),
    Case("page1", (1, 0, 150), page=1, causal=True),
    Case("page256-two-kv-heads-fp16", (515, 1, 1200), page=256, s_q=2, h_kv=2, dtype="float16", causal=True),
    Case("causal-sq4-shorter-than-sq", (0, 2, 3, 900), s_q=4, causal=True),
    Case("page16-tails", (33, 1, 500), page=16, tails=(-1, 2**31 - 1, None), extra_columns=3),
    Case("no-tokens-fp16", (0, 0), s_q=2, h_q=8, dtype="float16", causal=True),
    Case("one-long-sequence", (8000,)),
)


def make_inputs(case, seed):
    from mla_cupy.testing import make_decode_inputs

    inp = make_decode_inputs(len(case.seqlens), case.s_q, case.h_q, case.h_kv, page_block_size=case.page,
                             seqlens=list(case.seqlens), dtype=case.dtype, seed=seed)
    table = inp.block_table.copy()
    used = -(-np.asarray(case.seqlens) // case.page)
    for row, tail in enumerate(case.tails):
        if tail is not None:
            table[row, used[row]:] = tail
    if case.extra_columns:
        table = np.concatenate([table, np.full((table.shape[0], case.extra_columns), -1, np.int32)], axis=1)
    return dataclasses.replace(inp, block_table=np.ascontiguousarray(table))


def run_case(case, inp, stream):
    """One scheduler, decode and combine launch of `case` on `stream`; returns a failure or None."""
    import cupy

    from mla_cupy import flash_mla_with_kvcache, get_mla_metadata
    from mla_cupy.reference import flash_mla_with_kvcache_reference
    from mla_cupy.scheduler import schedule
    from mla_cupy.testing import compare_mla

    with stream:
        q, kc, bt, sl = (cupy.asarray(x) for x in (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens))
        m = case.s_q * case.h_q // case.h_kv
        sched, splits = get_mla_metadata(sl, m, case.h_kv)
        out, lse = flash_mla_with_kvcache(q, kc, bt, sl, 512, sched, splits, causal=case.causal)
        stream.synchronize()
        host = sched.get(), splits.get(), out.get(), lse.get()
        del q, kc, bt, sl, sched, splits, out, lse
    want_sched, want_splits = schedule(inp.cache_seqlens, host[0].shape[0])
    if not (np.array_equal(host[0], want_sched) and np.array_equal(host[1], want_splits)):
        return "the schedule differs from mla_cupy.scheduler.schedule"
    out_ref, lse_ref = flash_mla_with_kvcache_reference(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512,
                                                        causal=case.causal)
    report = compare_mla(host[2], host[3], out_ref, lse_ref, std=inp.std)
    return None if report.passed else str(report)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="portable,sm90", help="kernel families, comma-separated")
    parser.add_argument("--cases", default="", help="case names to run, comma-separated (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    if args.list or not cases:
        for c in CASES:
            print(f"{c.name:28s} {c}")
        return 0 if cases else 2

    import cupy

    cupy.cuda.set_allocator(None)  # before the first allocation: no pool, one cudaMalloc per array
    cupy.cuda.set_pinned_memory_allocator(None)

    from mla_cupy import _select, interface
    from mla_cupy._errors import UnsupportedDeviceError
    from mla_cupy.testing import gpu_status

    ok, reason = gpu_status()
    if not ok:
        print(f"sanitize_cases: {reason}")
        return 2
    device = cupy.cuda.runtime.getDevice()
    inputs = {c.name: make_inputs(c, args.seed + i) for i, c in enumerate(cases)}
    failed = ran = skipped = 0
    stream = cupy.cuda.Stream(non_blocking=True)
    for kind in args.kinds.split(","):
        with _select.forced(kind):
            for case in cases:
                label = f"[{kind}] {case.name}"
                try:
                    _select.decode_choice(device, case.dtype, 576, 512, case.s_q * case.h_q // case.h_kv, case.page)
                except UnsupportedDeviceError as exc:
                    print(f"{label}: skipped ({exc})", flush=True)
                    skipped += 1
                    continue
                try:
                    problem = run_case(case, inputs[case.name], stream)
                except Exception:  # noqa: BLE001 - reported, counted
                    problem = traceback.format_exc()
                ran += 1
                failed += problem is not None
                print(f"{label}: {'ok' if problem is None else 'FAILED: ' + problem}", flush=True)
    print(f"sanitize_cases: {ran} run, {skipped} skipped, {failed} failed", flush=True)

    # Free everything, then destroy the context: leak checking reports what is left then.
    del stream
    interface._workspaces.clear()
    interface._retired.clear()
    gc.collect()
    cupy.cuda.runtime.deviceSynchronize()
    # CuPy has no cudaDeviceReset (and links its own copy of the runtime): reset the device's
    # primary context through the driver, where leak checking reports what is still allocated.
    import ctypes

    rc = ctypes.CDLL("libcuda.so.1").cuDevicePrimaryCtxReset_v2(device)
    if rc:
        print(f"sanitize_cases: cuDevicePrimaryCtxReset failed (CUresult {rc})", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed or not ran else 0)  # no CuPy teardown against the destroyed context


if __name__ == "__main__":
    sys.exit(main())
