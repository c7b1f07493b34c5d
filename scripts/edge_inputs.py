"""Edge inputs side by side: mla_cupy and FlashMLA on the same awkward problems.

Each case runs in a process of its own per library (a library that crashes the CUDA context
must not take the next case down with it) and is judged against the float64 reference
(``mla_cupy.reference``): "ok" (within the numerical contract), "WRONG" (finished, results off),
"error: <Type>: <message>" (refused with an exception before or at the launch; the library is
still usable in that process, which the case checks with one ordinary call afterwards) or
"CRASH" (the process died, hung, or the context was unusable afterwards), with the detail.

The cases: a batch of 0 requests; h_q = h_kv (one query head per KV head); s_q larger than
every seqlen, causal; q and block_table as non-contiguous views (every other request of a
larger batch); a k_cache of 0 blocks while every seqlen is 0.

Usage (repo root, GPU machine): PYTHONPATH=. python3 scripts/edge_inputs.py [--peer DIR]
[--cases NAME,...] [--list]. The FlashMLA column needs the peer (``scripts/get_peers.sh``) and
torch; it reads "-" without them. Exit status 0 when no mla_cupy case is WRONG or CRASH, 1
otherwise, 2 without a usable GPU.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np

D, DV, PAGE = 576, 512, 64
MARK = "EDGE_RESULT "


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    what: str
    seqlens: tuple
    s_q: int = 1
    h_q: int = 16
    causal: bool = True
    strided: bool = False  # q and block_table: every other request of a batch twice as large
    zero_blocks: bool = False  # k_cache with 0 blocks (every seqlen must be 0)


CASES = (
    Case("batch-0", "a batch of 0 requests", ()),
    Case("h_q-equals-h_kv", "one query head per KV head (h_q = h_kv = 1)", (300, 64, 1), h_q=1),
    Case("s_q-over-seqlens", "s_q 4, causal, every seqlen shorter than s_q", (1, 2, 3, 0), s_q=4),
    Case("strided-batch", "q and block_table: every other request of a batch of 8", (700, 65, 1000, 1), strided=True),
    Case("zero-blocks", "k_cache of 0 blocks, every seqlen 0", (0, 0, 0), zero_blocks=True),
)


def make_inputs(case, seed=0):
    """(q, k_cache, block_table, cache_seqlens) as NumPy arrays (q and k_cache bfloat16), the
    k_cache NaN past every sequence's tokens, block tables shuffled."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    b = len(case.seqlens)
    full_b = 2 * b if case.strided else b
    repeat = 2 if case.strided else 1
    seqlens = np.array([n for n in case.seqlens for _ in range(repeat)], dtype=np.int32)
    pages = [-(-int(n) // PAGE) for n in seqlens]
    width = max(pages + [1])
    blocks = 0 if case.zero_blocks else sum(pages) + 2
    k_cache = np.full((blocks, PAGE, 1, D), np.nan, dtype=np.float32)
    order = rng.permutation(blocks)
    table = np.full((full_b, width), -1, dtype=np.int32)
    used = 0
    for r, n in enumerate(seqlens):
        for j in range(pages[r]):
            blk = int(order[used])
            used += 1
            table[r, j] = blk
            count = min(PAGE, int(n) - j * PAGE)
            k_cache[blk, :count] = rng.standard_normal((count, 1, D)) * 0.1
    q = (rng.standard_normal((full_b, case.s_q, case.h_q, D)) * 0.1).astype(ml_dtypes.bfloat16)
    k_cache = k_cache.astype(ml_dtypes.bfloat16)
    if case.strided:
        return q[::2], k_cache, table[::2], np.ascontiguousarray(seqlens[::2])
    return q, k_cache, table, seqlens


def reference(case, arrays):
    from mla_cupy.reference import flash_mla_with_kvcache_reference

    q, k_cache, table, seqlens = arrays
    return flash_mla_with_kvcache_reference(np.ascontiguousarray(q), k_cache, np.ascontiguousarray(table),
                                            seqlens, DV, causal=case.causal)


def _judge(case, arrays, out, lse):
    from mla_cupy.testing import compare_mla

    out_ref, lse_ref = reference(case, arrays)
    if out.shape != out_ref.shape or lse.shape != lse_ref.shape:
        return "WRONG", f"shapes {out.shape} / {lse.shape}, expected {out_ref.shape} / {lse_ref.shape}"
    if out.size == 0:
        return "ok", "empty results of the right shapes"
    report = compare_mla(out, lse, out_ref, lse_ref)
    return ("ok", "matches the reference") if report.passed else ("WRONG", " ".join(str(report).split())[:200])


def _mla_cupy(case):
    """(put, decode, to_host) for mla_cupy on CuPy arrays: `put` copies a NumPy array to the
    GPU, `decode` runs the scheduler and the decode on device arrays and waits for them,
    `to_host` turns (out, lse) into float32 NumPy arrays."""
    import cupy

    import mla_cupy
    from mla_cupy.bench import _bf16_dtype

    def put(x):
        if x.dtype.name == "bfloat16":  # the bits, as CuPy's (or ml_dtypes') bfloat16
            return cupy.asarray(np.ascontiguousarray(x).view(np.uint16)).view(_bf16_dtype(cupy))
        return cupy.asarray(x)

    def decode(q, k_cache, table, seqlens):
        sched, splits = mla_cupy.get_mla_metadata(seqlens, case.s_q * case.h_q, 1)
        result = mla_cupy.flash_mla_with_kvcache(q, k_cache, table, seqlens, DV, sched, splits, causal=case.causal)
        cupy.cuda.runtime.deviceSynchronize()
        return result

    return put, decode, lambda out, lse: (cupy.asnumpy(out).astype(np.float32), cupy.asnumpy(lse))


def _flashmla(case, peer):
    """(put, decode, to_host) for FlashMLA on torch tensors (see _mla_cupy)."""
    import torch

    if peer not in sys.path:
        sys.path.insert(0, peer)
    import flash_mla_interface as fm

    def put(x):
        host = np.ascontiguousarray(x)
        if x.dtype.name == "bfloat16":
            src = torch.from_numpy(host.view(np.int16)).view(torch.bfloat16)
        else:
            src = torch.from_numpy(host)
        # The strides torch gives a new tensor, also one without elements (FlashMLA checks that
        # the last dimension is contiguous, stride 1, which NumPy's strides of an empty array
        # need not be).
        return torch.empty(src.shape, dtype=src.dtype, device="cuda").copy_(src)

    def decode(q, k_cache, table, seqlens):
        sched, splits = fm.get_mla_metadata()
        result = fm.flash_mla_with_kvcache(q, k_cache, table, seqlens, DV, sched, splits, softmax_scale=D ** -0.5,
                                           causal=case.causal)
        torch.cuda.synchronize()
        return result

    return put, decode, lambda out, lse: (out.float().cpu().numpy(), lse.float().cpu().numpy())


def run_one(library, case, peer):
    """Runs `case` with `library` in this process; returns (verdict, detail)."""
    arrays = make_inputs(case)
    put, decode, to_host = _mla_cupy(case) if library == "mla_cupy" else _flashmla(case, peer)
    q, k_cache, table, seqlens = arrays
    dev = [put(x) for x in arrays]
    if case.strided:  # views with a doubled batch stride, as the arrays above
        dev[0], dev[2] = put(np.repeat(q, 2, axis=0))[::2], put(np.repeat(table, 2, axis=0))[::2]
    try:
        out, lse = decode(*dev)
    except Exception as exc:  # noqa: BLE001 - the verdict
        return "error", f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    return _judge(case, arrays, *to_host(out, lse))


def _still_usable(library, peer):
    """One ordinary call after the case (b 2, seqlen 100): None when it works, else why not."""
    ok = run_one(library, Case("after", "", (100, 100)), peer)
    return None if ok[0] == "ok" else f"an ordinary call afterwards failed: {ok[1]}"


def child(library, name, peer):
    case = next(c for c in CASES if c.name == name)
    verdict, detail = run_one(library, case, peer)
    broken = _still_usable(library, peer)
    if broken:
        verdict, detail = "CRASH", f"{verdict}: {detail}; {broken}"
    print(MARK + json.dumps({"verdict": verdict, "detail": detail}), flush=True)
    return 0


def spawn(library, case, peer, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", library, case.name, "--peer", peer]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "CRASH", f"no result within {timeout} s (hung)"
    for line in run.stdout.splitlines():
        if line.startswith(MARK):
            got = json.loads(line[len(MARK):])
            return got["verdict"], got["detail"]
    tail = [ln for ln in (run.stderr or run.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
    return "CRASH", f"exit {run.returncode}: {tail[0][:160]}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", default=os.path.join(".peers", "flashmla"), help="FlashMLA peer folder")
    p.add_argument("--cases", default="", help="case names, comma-separated (default: all)")
    p.add_argument("--timeout", type=int, default=120, help="seconds per case and library")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--child", nargs=2, metavar=("LIBRARY", "CASE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child[0], args.child[1], args.peer)
    cases = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    if args.list:
        for c in CASES:
            print(f"{c.name:18s} {c.what}")
        return 0
    from mla_cupy.testing import gpu_status

    ok, reason = gpu_status()
    if not ok:
        print(f"edge_inputs: {reason}")
        return 2
    import importlib.util

    peer_missing = None
    if not os.path.isfile(os.path.join(args.peer, "flash_mla_interface.py")):
        peer_missing = f"peer not found in {args.peer} (scripts/get_peers.sh)"
    elif importlib.util.find_spec("torch") is None:
        peer_missing = "torch is not installed"
    bad = 0
    print(f"{'case':18s} {'mla_cupy':54s} FlashMLA")
    for case in cases:
        ours = spawn("mla_cupy", case, args.peer, args.timeout)
        theirs = ("-", peer_missing) if peer_missing else spawn("flashmla", case, args.peer, args.timeout)
        bad += ours[0] in ("WRONG", "CRASH")
        print(f"{case.name:18s} {(ours[0] + ': ' + ours[1])[:54]:54s} {theirs[0]}: {theirs[1][:90]}")
        for who, (verdict, detail) in (("mla_cupy", ours), ("FlashMLA", theirs)):
            if len(verdict) + len(detail) + 2 > 54:
                print(f"    {who}: {verdict}: {detail}")
    print(f"edge_inputs: {len(cases)} cases; mla_cupy wrong or crashed on {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
