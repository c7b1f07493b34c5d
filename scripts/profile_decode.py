"""One decode call at a standard shape, for a profiler (e.g. Nsight Compute) to capture.

Usage: ``python scripts/profile_decode.py [--b 128] [--s-q 1] [--h-q 128] [--seqlen 4096]``;
runs a warm-up call, synchronises, then the call to capture, and prints its kernel kind.
"""

import argparse
import sys

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--b", type=int, default=128)
    p.add_argument("--s-q", type=int, default=1)
    p.add_argument("--h-q", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=4096)
    args = p.parse_args(argv)

    import cupy as cp
    import ml_dtypes

    import mla_cupy
    from mla_cupy import _select

    page, d, dv = 64, 576, 512
    pages = -(-args.seqlen // page)
    rs = cp.random.RandomState(0)

    def bf16(shape):
        x = rs.standard_normal(shape, dtype=cp.float32) * 0.1
        return (x.view(cp.uint32) >> 16).astype(cp.uint16).view(np.dtype(ml_dtypes.bfloat16))

    k_cache = bf16((args.b * pages, page, 1, d))
    q = bf16((args.b, args.s_q, args.h_q, d))
    table = cp.arange(args.b * pages, dtype=cp.int32).reshape(args.b, pages)
    seqlens = cp.full((args.b,), args.seqlen, dtype=cp.int32)
    sched, splits = mla_cupy.get_mla_metadata(seqlens, args.s_q * args.h_q, 1)
    for _ in range(2):
        mla_cupy.flash_mla_with_kvcache(q, k_cache, table, seqlens, dv, sched, splits, causal=True)
        cp.cuda.Device().synchronize()
    choice = _select.decode_choice(0, "bfloat16", d, dv, args.s_q * args.h_q, page)
    print(f"profiled: b{args.b} s_q{args.s_q} h{args.h_q} {args.seqlen} tokens, kernel family {choice.family.NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
