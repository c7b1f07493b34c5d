"""Quick GPU smoke check: a few shapes against the float64 reference, and two timings.

Usage (repo root, GPU machine): PYTHONPATH=. python3 scripts/smoke.py
"""
import sys
import time
import traceback

import cupy
import numpy as np

import mla_cupy
from mla_cupy import reference, scheduler, testing

CASES = [
    # b, s_q, h_q, h_kv, d, dv, page, seqlens, causal, dtype, std
    (2, 1, 16, 1, 576, 512, 64, [100, 300], False, "bfloat16", 0.1),
    (3, 1, 128, 1, 576, 512, 64, [0, 1, 4000], True, "bfloat16", 0.1),
    (4, 2, 32, 1, 576, 512, 16, [63, 64, 65, 2000], True, "float16", 0.1),
    (2, 4, 16, 2, 512, 512, 7, [5, 900], True, "bfloat16", 1.0),
    (2, 3, 8, 1, 320, 256, 1, [1, 200], True, "float16", 0.1),
    (140, 1, 64, 1, 576, 512, 256, None, True, "bfloat16", 0.1),
]


def run_case(case, seed):
    b, s_q, h_q, h_kv, d, dv, page, seqlens, causal, dtype, std = case
    inp = testing.make_decode_inputs(b, s_q, h_q, h_kv=h_kv, head_dim=d, head_dim_v=dv, page_block_size=page,
                                     seqlens=seqlens, mean_seqlen=300, varlen=seqlens is None, dtype=dtype,
                                     std=std, seed=seed)
    q, kc, bt, sl = (cupy.asarray(x) for x in (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens))
    sched, nsplit = mla_cupy.get_mla_metadata(sl, s_q * h_q // h_kv, h_kv)
    parts = sched.shape[0]
    ref_sched, ref_ns = scheduler.schedule(inp.cache_seqlens, parts)
    sched_ok = np.array_equal(sched.get(), ref_sched) and np.array_equal(nsplit.get(), ref_ns)
    out, lse = mla_cupy.flash_mla_with_kvcache(q, kc, bt, sl, dv, sched, nsplit, causal=causal)
    o_ref, l_ref = reference.flash_mla_with_kvcache_reference(inp.q, inp.k_cache, inp.block_table,
                                                              inp.cache_seqlens, dv, causal=causal)
    rep = testing.compare_mla(out, lse, o_ref, l_ref, std=std)
    return sched_ok, rep


def main():
    ok = True
    for i, case in enumerate(CASES):
        try:
            sched_ok, rep = run_case(case, seed=1000 + i)
            print(f"case {i} {case[:7]} sched_ok={sched_ok} passed={rep.passed}\n   {rep}")
            ok &= sched_ok and rep.passed
        except Exception:
            traceback.print_exc()
            ok = False
    # timings
    for (b, s_q, h_q, sk) in [(128, 1, 16, 4096), (128, 2, 128, 4096), (128, 1, 128, 4096)]:
        d, dv, page = 576, 512, 64
        nb = b * sk // page
        kc = (cupy.random.standard_normal((nb, page, 1, d), dtype=cupy.float32) * 0.1).astype(cupy.float16)
        q = (cupy.random.standard_normal((b, s_q, h_q, d), dtype=cupy.float32) * 0.1).astype(cupy.float16)
        bt = cupy.random.permutation(nb).astype(cupy.int32).reshape(b, -1)
        sl = cupy.full((b,), sk, dtype=cupy.int32)
        sched, ns = mla_cupy.get_mla_metadata(sl, s_q * h_q, 1)
        for _ in range(3):
            mla_cupy.flash_mla_with_kvcache(q, kc, bt, sl, dv, sched, ns, causal=True)
        e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(20):
            e0.record()
            mla_cupy.flash_mla_with_kvcache(q, kc, bt, sl, dv, sched, ns, causal=True)
            e1.record()
            e1.synchronize()
            times.append(cupy.cuda.get_elapsed_time(e0, e1) * 1e3)
        t = float(np.median(times))
        byts = b * sk * d * 2
        flops = b * s_q * h_q * sk * 2 * (d + dv)
        print(f"b{b} s_q{s_q} h{h_q} s{sk}: {t:.1f} us  {byts / t / 1e6:.2f} TB/s  {flops / t / 1e6:.1f} TFLOP/s")
    print("SMOKE", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
