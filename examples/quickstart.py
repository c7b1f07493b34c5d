"""Quickstart: one MLA decode step on a DeepSeek-shaped batch, checked against float64.

Four requests of 1K-4K cached tokens, one new query token each, 128 query heads sharing one
latent KV head of width 576 (the values are its first 512 columns), pages of 64 tokens in a
shuffled pool. The two calls are FlashMLA's: the tile schedule once per decode step, then the
attention once per layer. The result is compared with the NumPy float64 reference.

Without a CUDA GPU it says so and runs the NumPy reference alone on a smaller batch.

    python examples/quickstart.py
"""

import sys
import time

import numpy as np

from mla_cupy.reference import flash_mla_with_kvcache_reference
from mla_cupy.testing import assert_mla_close, gpu_status, make_decode_inputs


def why_no_gpu():
    """None when CuPy sees a CUDA GPU mla_cupy supports, else the reason it does not (no CuPy,
    no NVIDIA driver or GPU, a driver too old for CuPy, a GPU older than compute capability 8.0)."""
    ok, reason = gpu_status()
    return None if ok else reason


def run_on_gpu(rng):
    import cupy as cp

    from mla_cupy import flash_mla_with_kvcache, get_mla_metadata

    b, s_q, h_q, h_kv, d, dv = 4, 1, 128, 1, 576, 512
    host = make_decode_inputs(b, s_q, h_q, h_kv, head_dim=d, head_dim_v=dv, page_block_size=64,
                              seqlens=rng.integers(1024, 4097, size=b),
                              seed=int(rng.integers(2**31)))
    q = cp.asarray(host.q)                          # [b, s_q, h_q, d] bfloat16
    k_cache = cp.asarray(host.k_cache)              # [num_blocks, 64, h_kv, d] bfloat16
    block_table = cp.asarray(host.block_table)      # [b, max_blocks_per_seq] int32
    cache_seqlens = cp.asarray(host.cache_seqlens)  # [b] int32

    # Once per decode step: how the work is split over the SMs (computed on the GPU).
    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    # Once per layer (the first call compiles the kernels; later runs load them from disk).
    start = time.perf_counter()
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, dv,
                                      tile_scheduler_metadata, num_splits, causal=True)
    cp.cuda.get_current_stream().synchronize()
    first_call = time.perf_counter() - start

    out_ref, lse_ref = flash_mla_with_kvcache_reference(
        host.q, host.k_cache, host.block_table, host.cache_seqlens, dv, causal=True)
    report = assert_mla_close(out, lse, out_ref, lse_ref, std=host.std,
                              msg=f"quickstart, seed {host.seed}")

    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    print(f"OK on {name}: out {tuple(out.shape)} {out.dtype}, lse {tuple(lse.shape)} {lse.dtype}, "
          f"seqlens {host.cache_seqlens.tolist()}; vs float64 reference: "
          f"out max |error| {report.out_max_abs_error:.2e}, "
          f"cosine difference {report.out_cos_diff:.1e}, lse max |error| "
          f"{report.lse_max_abs_error:.2e}; first call {first_call * 1e3:.0f} ms (includes "
          f"compiling the kernels or loading them from the disk cache)")


def run_reference_only(rng):
    b, s_q, h_q, h_kv, d, dv = 2, 1, 16, 1, 576, 512
    host = make_decode_inputs(b, s_q, h_q, h_kv, head_dim=d, head_dim_v=dv, page_block_size=64,
                              seqlens=rng.integers(256, 1025, size=b),
                              seed=int(rng.integers(2**31)))
    start = time.perf_counter()
    out, lse = flash_mla_with_kvcache_reference(
        host.q, host.k_cache, host.block_table, host.cache_seqlens, dv, causal=True)
    elapsed = time.perf_counter() - start
    finite = bool(np.isfinite(out).all() and np.isfinite(lse).all())
    print(f"NumPy reference: out {out.shape} {out.dtype}, lse {lse.shape} in "
          f"[{lse.min():.3f}, {lse.max():.3f}], seqlens {host.cache_seqlens.tolist()}, "
          f"all finite: {finite}, {elapsed * 1e3:.0f} ms")
    return 0 if finite else 1


def main():
    rng = np.random.default_rng()
    reason = why_no_gpu()
    if reason is not None:
        print(f"No CUDA GPU available: {reason}. Running the NumPy reference alone on a "
              f"smaller batch.")
        return run_reference_only(rng)
    run_on_gpu(rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
