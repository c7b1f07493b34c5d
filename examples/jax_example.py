"""mla_cupy from JAX: jax.Arrays in, jax.Arrays out.

The inputs are made with jax.random on the GPU (float16 this time, 16 query heads, varying
sequence lengths) and handed over as they are: mla_cupy reads them through DLPack without a
copy and returns jax.Arrays. Call it on concrete arrays, outside ``jax.jit``. The result is
compared with the NumPy float64 reference.

    python examples/jax_example.py
"""

import os
import sys

# JAX would otherwise reserve most of the GPU's memory for itself at start-up.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402


def gpu_devices(jax):
    try:
        return jax.devices("gpu")
    except RuntimeError:  # no GPU backend (CPU-only jaxlib, or no device)
        return []


def main():
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        print("JAX is not installed; nothing to run.")
        return 0
    if not gpu_devices(jax):
        print("No CUDA GPU visible to JAX; nothing to run.")
        return 0

    from mla_cupy import flash_mla_with_kvcache, get_mla_metadata
    from mla_cupy.reference import flash_mla_with_kvcache_reference
    from mla_cupy.testing import assert_mla_close

    b, s_q, h_q, h_kv, d, dv, page = 16, 1, 16, 1, 576, 512, 64
    max_seqlen = 4096
    blocks_per_seq = max_seqlen // page
    num_blocks = b * blocks_per_seq

    with jax.default_device(gpu_devices(jax)[0]):
        seed = int(np.random.SeedSequence().entropy % 2**31)
        k_seq, k_perm, k_q, k_kv = jax.random.split(jax.random.key(seed), 4)
        cache_seqlens = jax.random.randint(k_seq, (b,), 1, max_seqlen + 1, dtype=jnp.int32)
        block_table = jax.random.permutation(k_perm, num_blocks).astype(jnp.int32)
        block_table = block_table.reshape(b, blocks_per_seq)
        q = (0.1 * jax.random.normal(k_q, (b, s_q, h_q, d))).astype(jnp.float16)
        k_cache = (0.1 * jax.random.normal(k_kv, (num_blocks, page, h_kv, d))).astype(jnp.float16)

        tile_scheduler_metadata, num_splits = get_mla_metadata(
            cache_seqlens, s_q * h_q // h_kv, h_kv)
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, dv,
                                          tile_scheduler_metadata, num_splits, causal=True)
        # The results are ordinary jax.Arrays: JAX code can use them directly.
        out_norm = jnp.linalg.norm(out.astype(jnp.float32))

    if not (isinstance(out, jax.Array) and isinstance(lse, jax.Array)):
        raise TypeError(f"expected jax.Arrays back, got {type(out)} and {type(lse)}")
    if out.dtype != q.dtype or lse.dtype != jnp.float32:
        raise TypeError(f"unexpected result dtypes: out {out.dtype}, lse {lse.dtype}")

    out_ref, lse_ref = flash_mla_with_kvcache_reference(
        np.asarray(q), np.asarray(k_cache), np.asarray(block_table), np.asarray(cache_seqlens),
        dv, causal=True)
    report = assert_mla_close(np.asarray(out), np.asarray(lse), out_ref, lse_ref, std=0.1,
                              msg="JAX example")
    print(f"OK with JAX {jax.__version__}: out {out.shape} {out.dtype}, lse {lse.shape} "
          f"{lse.dtype} on {next(iter(out.devices()))}, |out| {float(out_norm):.3f}; "
          f"vs float64 reference: out max |error| {report.out_max_abs_error:.2e}, "
          f"lse max |error| {report.lse_max_abs_error:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
