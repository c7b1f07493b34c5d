"""Host-side cost of one decode call: wall time per call and a cProfile of the Python path.

Usage (repo root, GPU machine): PYTHONPATH=. python3 scripts/host_profile.py
"""
import cProfile
import pstats
import time

import cupy

import mla_cupy


def main():
    b, s_q, h_q, d, dv, page, sk = 128, 1, 16, 576, 512, 64, 512
    nb = b * sk // page
    kc = cupy.random.standard_normal((nb, page, 1, d), dtype=cupy.float32).astype(cupy.float16)
    q = cupy.random.standard_normal((b, s_q, h_q, d), dtype=cupy.float32).astype(cupy.float16)
    bt = cupy.arange(nb, dtype=cupy.int32).reshape(b, -1)
    sl = cupy.full((b,), sk, dtype=cupy.int32)
    sched, ns = mla_cupy.get_mla_metadata(sl, s_q * h_q, 1)
    call = lambda: mla_cupy.flash_mla_with_kvcache(q, kc, bt, sl, dv, sched, ns, causal=True)  # noqa: E731
    for _ in range(20):
        call()
    cupy.cuda.Device().synchronize()
    n = 300
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    t1 = time.perf_counter()
    cupy.cuda.Device().synchronize()
    print(f"host time per flash_mla_with_kvcache call: {(t1 - t0) / n * 1e6:.1f} us")
    t0 = time.perf_counter()
    for _ in range(n):
        mla_cupy.get_mla_metadata(sl, s_q * h_q, 1)
    t1 = time.perf_counter()
    cupy.cuda.Device().synchronize()
    print(f"host time per get_mla_metadata call: {(t1 - t0) / n * 1e6:.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        call()
    prof.disable()
    cupy.cuda.Device().synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
