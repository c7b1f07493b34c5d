"""The DeepSeek-V3-shaped decode step of deepseek_v3_decode.py in JAX: absorbed MLA in every
layer over a paged KV cache with a page allocator, mla_cupy called on jax.Arrays.

Each layer does what the CuPy example's does (q_a / RMSNorm / q_b projections, q_nope . W_UK
into the 512-wide latent space, RoPE on the 64 rope dims, kv_a projection with RMSNorm and RoPE,
the new tokens' 576-wide rows written into the layer's paged bfloat16 cache, attention with
softmax_scale 1/sqrt(192), W_UV and W_O added to the residual), in two ``jax.jit`` functions
around the attention: the projections before it (which also write the new rows into the cache,
a functional update) and the ones after it. The attention between them is
``mla_cupy.flash_mla_with_kvcache`` on the concrete jax.Arrays: mla_cupy reads them through
DLPack without a copy and returns jax.Arrays, eagerly, outside ``jax.jit``. The weights are
bfloat16, the products accumulate in float32.

Fewer features than the CuPy example: the step is not captured as a CUDA graph (mla_cupy's JAX
route is eager; deepseek_v3_decode.py shows the graph), and only eager steps are timed. The
page allocator, the sizes and flags and the host-side checks are the CuPy example's, imported
from deepseek_v3_decode.py beside this file. After a warm-up step (compiles) it times
``--steps`` steps, then checks the last layer of the last step (q and KV rows against the host,
the attention against the float64 reference, the output projection against the host) and ends
with a line starting with ``OK``.

Flags as in the CuPy example: ``--layers N`` (61), ``--scale {1,2,4,8,16}`` (4: hidden, q_lora_rank
and heads divided by 4), ``--batch B`` (8), ``--context T`` (2048), ``--steps N`` (8), ``--mtp``
(two query tokens per sequence per step), ``--seed S``. The true DeepSeek-V3 size (about 22 GiB
of bfloat16 weights and KV caches):

    python examples/deepseek_v3_decode_jax.py --scale 1
    python examples/deepseek_v3_decode_jax.py
"""

import functools
import os
import sys
import time

# JAX would otherwise reserve most of the GPU's memory for itself at start-up, leaving none
# for CuPy.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

from deepseek_v3_decode import (  # noqa: E402 (the CuPy example, beside this file)
    HEAD_DIM, HEADS, HIDDEN, KV_LORA_RANK, NOPE_DIM, PAGE, Q_LORA_RANK, ROPE_DIM, SOFTMAX_SCALE,
    V_HEAD_DIM, PageAllocator, Sequences, check_layer, inverse_frequencies, parse_args, rms_norm,
    rope)


def gpu_devices(jax):
    try:
        return jax.devices("gpu")
    except RuntimeError:  # no GPU backend (CPU-only jaxlib, or no device)
        return []


def make_layer_functions(jax, jnp, batch, s_q):
    """The jitted halves of a layer around its attention (compiled once, for every layer)."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    inv_freq = jnp.asarray(inverse_frequencies(np), dtype=f32)

    def mm(spec, a, b):  # bfloat16 operands, float32 result
        return jnp.einsum(spec, a, b, preferred_element_type=f32)

    @functools.partial(jax.jit, donate_argnums=(2,))  # the cache is updated in place
    def before_attention(w, x, cache, block_table, seqlens):
        """From hidden states ``x`` [tokens, hidden]: the q rows [batch, s_q, heads, 576]
        (bfloat16) and ``cache`` with the new tokens' rows written at their slots."""
        N, h = x.shape[0], w["w_uk"].shape[0]
        # Token t = sequence * s_q + j sits at position seqlen - s_q + j.
        pos = (seqlens[:, None] - s_q + jnp.arange(s_q, dtype=jnp.int32)[None, :]).reshape(-1)
        angle = pos[:, None].astype(f32) * inv_freq[None, :]
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        xn = rms_norm(jnp, x, w["attn_norm"]).astype(bf16)
        cq = rms_norm(jnp, mm("td,dr->tr", xn, w["wq_a"]), w["q_a_norm"]).astype(bf16)
        q = mm("tr,rk->tk", cq, w["wq_b"]).reshape(N, h, NOPE_DIM + ROPE_DIM)
        q_lat = mm("thn,hnc->thc", q[:, :, :NOPE_DIM].astype(bf16), w["w_uk"])
        q_pe = rope(jnp, q[:, :, NOPE_DIM:], cos[:, None, :], sin[:, None, :])
        q_rows = jnp.concatenate([q_lat, q_pe], axis=-1).astype(bf16)
        kv = mm("td,dk->tk", xn, w["wkv_a"])
        rows = jnp.concatenate([rms_norm(jnp, kv[:, :KV_LORA_RANK], w["kv_a_norm"]),
                                rope(jnp, kv[:, KV_LORA_RANK:], cos, sin)], axis=1)
        page = block_table[jnp.arange(N) // s_q, pos // PAGE]
        cache = cache.at[page, pos % PAGE, 0].set(rows.astype(bf16))
        return q_rows.reshape(batch, s_q, h, HEAD_DIM), cache

    @jax.jit
    def after_attention(w, x, out):
        """The residual after the attention output ``out`` [batch, s_q, heads, 512], and what
        was added to it."""
        N, h = x.shape[0], w["w_uv"].shape[0]
        v = mm("thc,hcv->thv", out.reshape(N, h, KV_LORA_RANK), w["w_uv"])
        y = mm("tk,kd->td", v.astype(bf16).reshape(N, h * V_HEAD_DIM), w["wo"])
        return (x.astype(f32) + y).astype(bf16), y

    return before_attention, after_attention


def run(jax, jnp, args):
    from mla_cupy import flash_mla_with_kvcache, get_mla_metadata

    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    L, batch, s_q = args.layers, args.batch, 2 if args.mtp else 1
    H, R, h = HIDDEN // args.scale, Q_LORA_RANK // args.scale, HEADS // args.scale
    N = batch * s_q
    max_new_tokens = (1 + args.steps) * s_q  # warm-up step, then the timed ones
    max_pages_per_seq = -(-(args.context + max_new_tokens + s_q) // PAGE)
    num_pages = batch * max_pages_per_seq
    f32, bf16 = jnp.float32, jnp.bfloat16

    @jax.jit
    def make_layer(key):
        k = jax.random.split(key, 9)

        def weight(i, shape, fan_in):  # std 1/sqrt(fan_in): activations stay of order 1
            return (jax.random.normal(k[i], shape, f32) * fan_in ** -0.5).astype(bf16)

        def norm_weight(i, n):
            return 1 + 0.1 * jax.random.normal(k[i], (n,), f32)

        return {"attn_norm": norm_weight(0, H), "wq_a": weight(1, (H, R), H),
                "q_a_norm": norm_weight(2, R),
                "wq_b": weight(3, (R, h * (NOPE_DIM + ROPE_DIM)), R),  # per head: [nope, rope]
                "wkv_a": weight(4, (H, HEAD_DIM), H),  # [latent, rope]
                "kv_a_norm": norm_weight(5, KV_LORA_RANK),
                "w_uk": weight(6, (h, NOPE_DIM, KV_LORA_RANK), NOPE_DIM),
                "w_uv": weight(7, (h, KV_LORA_RANK, V_HEAD_DIM), KV_LORA_RANK),
                "wo": weight(8, (h * V_HEAD_DIM, H), h * V_HEAD_DIM)}

    @jax.jit
    def make_cache(key):  # random rows: the prompts' stand-in
        return jax.random.normal(key, (num_pages, PAGE, 1, HEAD_DIM), f32).astype(bf16)

    start = time.perf_counter()
    keys = jax.random.split(jax.random.key(seed), 2 * L + 1)
    weights = [make_layer(keys[i]) for i in range(L)]
    caches = [make_cache(keys[L + i]) for i in range(L)]
    jax.block_until_ready((weights, caches))
    allocator = PageAllocator(num_pages, batch, max_pages_per_seq, rng)
    sequences = Sequences(allocator, rng, args.context, max_new_tokens)
    prompt_pages = allocator.allocated
    weights_gib = sum(a.nbytes for w in weights for a in w.values()) / 2**30
    cache_gib = sum(c.nbytes for c in caches) / 2**30
    print(f"DeepSeek-V3 decode in JAX {jax.__version__}, scale 1/{args.scale}: {L} layers, "
          f"hidden {H}, q_lora_rank {R}, {h} heads, batch {batch}, s_q {s_q}, pages of {PAGE} "
          f"({num_pages} in the pool); weights {weights_gib:.2f} GiB bfloat16, KV caches "
          f"{cache_gib:.2f} GiB bfloat16; made in {time.perf_counter() - start:.1f} s "
          f"(seed {seed})")

    before_attention, after_attention = make_layer_functions(jax, jnp, batch, s_q)
    check = L - 1

    def decode_step(index):
        """One decode step: the schedule once, then every layer. Returns what the check needs
        of layer ``check``: its input, q rows, attention out and lse, and residual update."""
        block_table = jnp.asarray(allocator.block_table)
        seqlens = jnp.asarray(allocator.seqlens)
        x = jax.random.normal(jax.random.fold_in(keys[-1], index), (N, H), f32).astype(bf16)
        schedule = get_mla_metadata(seqlens, s_q * h, 1)
        for layer in range(L):
            q, caches[layer] = before_attention(weights[layer], x, caches[layer], block_table,
                                                seqlens)
            out, lse = flash_mla_with_kvcache(q, caches[layer], block_table, seqlens,
                                              KV_LORA_RANK, *schedule,
                                              softmax_scale=SOFTMAX_SCALE, causal=True)
            x_in = x
            x, y = after_attention(weights[layer], x, out)
            if layer == check:
                kept = (x_in, q, out, lse, y)
        jax.block_until_ready(x)
        return kept

    times = []
    for index in range(1 + args.steps):
        sequences.before_step(s_q)
        block_table, seqlens = allocator.block_table.copy(), allocator.seqlens.copy()
        t0 = time.perf_counter()
        kept = decode_step(index)
        elapsed = time.perf_counter() - t0
        if index == 0:
            first_step_s = elapsed
        else:
            times.append(elapsed * 1e3)
        sequences.after_step()

    x_in, q, out, lse, y = kept
    if not all(isinstance(a, jax.Array) for a in (out, lse)):
        raise TypeError(f"expected jax.Arrays back, got {type(out)} and {type(lse)}")
    report, errors = check_layer(
        check, {k: np.asarray(v) for k, v in weights[check].items()}, np.asarray(x_in),
        np.asarray(q), np.asarray(caches[check]), np.asarray(out), np.asarray(lse),
        np.asarray(y), block_table, seqlens)
    step_ms = float(np.median(times))
    print(f"first step (compiles the jitted functions and mla_cupy's kernels, or loads them) "
          f"{first_step_s:.2f} s; then {step_ms:.2f} ms per step (eager, median of "
          f"{args.steps})")
    print(f"page allocator: {prompt_pages} pages for the first prompts, "
          f"{allocator.allocated - prompt_pages} more during the run (new pages and new "
          f"sequences), {allocator.freed} freed by {sequences.finished} finished sequences")
    print(f"OK with JAX {jax.__version__}: layer {check} of the last step matches: q rows, KV "
          f"rows at their slots and output projection vs the host (relative errors "
          + ", ".join(f"{e:.1e}" for e in errors.values())
          + f"), attention vs the float64 reference (out max |error| "
          f"{report.out_max_abs_error:.2e}, lse max |error| {report.lse_max_abs_error:.2e}); "
          f"{L} layers at {step_ms:.2f} ms per step")
    return 0


def main(argv=None):
    args = parse_args(argv, __doc__, steps_help="steps timed (eagerly; no CUDA graph here)")
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        print("JAX is not installed; nothing to run.")
        return 0
    devices = gpu_devices(jax)
    if not devices:
        print("No CUDA GPU visible to JAX; nothing to run.")
        return 0
    with jax.default_device(devices[0]):
        return run(jax, jnp, args)


if __name__ == "__main__":
    sys.exit(main())
