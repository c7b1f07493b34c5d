"""GPU lane: the experimental jax.jit route (``mla_cupy.jax``) on the GPU.

Inside ``jax.jit`` the schedule equals its host twin and ``out`` / ``lse`` equal the float64
reference within the numerical contract (``assert_mla_close``), on inputs made the FlashMLA way
(NaN in every slot that must not be read); a jitted loop over three layers (a Python loop and
``lax.scan``); the primitives called outside jit; and the route gives the same bits as the eager
call forced onto the portable kernel. Needs JAX with its CUDA plugin (skipped, with the reason,
where JAX has no GPU backend).
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX shares the GPU with CuPy here

import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytestmark = pytest.mark.gpu

jax = pytest.importorskip("jax", reason="JAX is not installed")

import jax.numpy as jnp  # noqa: E402

import mla_cupy  # noqa: E402
import mla_cupy.jax as mj  # noqa: E402
from mla_cupy import _select  # noqa: E402
from mla_cupy.reference import flash_mla_with_kvcache_reference  # noqa: E402
from mla_cupy.scheduler import schedule  # noqa: E402
from mla_cupy.testing import assert_mla_close, make_decode_inputs  # noqa: E402

BASE_SEED = int(os.environ.get("MLA_CUPY_TEST_SEED", np.random.SeedSequence().entropy % (1 << 31)))


def case_seed(*tags):
    return (BASE_SEED + zlib.crc32(repr(tags).encode())) % (1 << 31)


@pytest.fixture(scope="module")
def gpu():
    """JAX's first GPU; skipped, as the other JAX tests of the gpu lane are, where JAX has no
    GPU backend (the reason names the JAX version)."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError as exc:
        devices, why = [], str(exc)
    else:
        why = "no GPU device"
    if not devices:
        pytest.skip(f"JAX {jax.__version__} has no GPU backend ({why}); install jax[cuda12] or jax[cuda13]")
    return devices[0]


def put(inp, device):
    return tuple(jax.device_put(x, device) for x in (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens))


def rows_per_kv_head(inp):
    _, s_q, h_q, _ = inp.q.shape
    return s_q * h_q // inp.k_cache.shape[2]


def context(inp, causal, label):
    b, s_q, h_q, d = inp.q.shape
    return (f"[{label}] seed={inp.seed} (rerun with MLA_CUPY_TEST_SEED={BASE_SEED}) b={b} s_q={s_q} h_q={h_q} "
            f"h_kv={inp.k_cache.shape[2]} d={d} dv={inp.head_dim_v} page={inp.page_block_size} "
            f"dtype={inp.q.dtype.name} causal={causal} seqlens={inp.cache_seqlens.tolist()[:8]}")


def reference(inp, causal, softmax_scale=None):
    return flash_mla_with_kvcache_reference(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, inp.head_dim_v,
                                            softmax_scale=softmax_scale, causal=causal)


def jitted_step(inp, causal, softmax_scale=None):
    m, h_kv, dv = rows_per_kv_head(inp), inp.k_cache.shape[2], inp.head_dim_v

    @jax.jit
    def step(q, k_cache, block_table, seqlens):
        sched, splits = mj.get_mla_metadata(seqlens, m, h_kv)
        out, lse = mj.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, dv, sched, splits,
                                             softmax_scale=softmax_scale, causal=causal)
        return sched, splits, out, lse

    return step


CASES = [
    # (dtype, head_dim, head_dim_v, batch, s_q, h_q, h_kv, page, seqlens or mean, causal, softmax_scale)
    ("bfloat16", 576, 512, 8, 1, 16, 1, 64, 4096, True, None),
    ("float16", 576, 512, 8, 1, 16, 1, 64, 4096, False, None),
    ("bfloat16", 576, 512, 16, 2, 128, 1, 64, 2048, True, None),
    ("bfloat16", 576, 512, 10, 1, 128, 1, 64, [0, 1, 63, 64, 65, 129, 1000, 4097, 7, 2], True, None),
    ("float16", 512, 512, 4, 3, 32, 2, 16, 1500, True, 0.05),
    ("bfloat16", 320, 256, 5, 2, 64, 1, 7, [1, 300, 0, 999, 64], False, None),
    ("bfloat16", 576, 512, 150, 2, 16, 1, 64, 300, True, None),
    ("bfloat16", 576, 512, 3, 1, 16, 1, 256, 9000, True, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-d{c[1]}-b{c[3]}-sq{c[4]}-hq{c[5]}-hkv{c[6]}-p{c[7]}")
def test_jit_matches_the_reference(gpu, case):
    dtype, d, dv, b, s_q, h_q, h_kv, page, lens, causal, scale = case
    kwargs = dict(seqlens=lens) if isinstance(lens, list) else dict(mean_seqlen=lens, varlen=True)
    inp = make_decode_inputs(b, s_q, h_q, h_kv=h_kv, head_dim=d, head_dim_v=dv, page_block_size=page, dtype=dtype,
                             seed=case_seed("jit", case), **kwargs)
    msg = context(inp, causal, "jit")
    sched, splits, out, lse = jitted_step(inp, causal, scale)(*put(inp, gpu))
    assert isinstance(out, jax.Array) and out.dtype == inp.q.dtype and lse.dtype == jnp.float32
    sched_ref, splits_ref = schedule(inp.cache_seqlens, sched.shape[0])
    assert np.array_equal(np.asarray(sched), sched_ref), msg
    assert np.array_equal(np.asarray(splits), splits_ref), msg
    out_ref, lse_ref = reference(inp, causal, scale)
    assert_mla_close(np.asarray(out), np.asarray(lse), out_ref, lse_ref, std=inp.std, msg=msg)


@pytest.mark.parametrize("loop", ["python", "scan"])
def test_jit_of_three_layers(gpu, loop):
    layers, b, s_q, h_q, page = 3, 6, 2, 64, 64
    base = make_decode_inputs(b, s_q, h_q, page_block_size=page, mean_seqlen=3000, varlen=True,
                              seed=case_seed("layers", loop))
    per_layer = [make_decode_inputs(b, s_q, h_q, page_block_size=page, seqlens=base.cache_seqlens.tolist(),
                                    seed=case_seed("layers", loop, i)) for i in range(layers)]
    # One block table and one set of lengths for the step; each layer its own q and cache, laid
    # out on the step's pages.
    qs = np.stack([x.q for x in per_layer])
    caches = np.stack([relayout(x, base) for x in per_layer])
    m = s_q * h_q

    @jax.jit
    def step(qs, caches, block_table, seqlens):
        sched, splits = mj.get_mla_metadata(seqlens, m, 1)
        if loop == "python":
            outs = [mj.flash_mla_with_kvcache(qs[i], caches[i], block_table, seqlens, 512, sched, splits, causal=True)
                    for i in range(layers)]
            return jnp.stack([o for o, _ in outs]), jnp.stack([lse for _, lse in outs])

        def body(carry, layer):
            q, cache = layer
            return carry, mj.flash_mla_with_kvcache(q, cache, block_table, seqlens, 512, sched, splits, causal=True)

        return jax.lax.scan(body, None, (qs, caches))[1]

    dev = lambda x: jax.device_put(x, gpu)  # noqa: E731
    out, lse = step(dev(qs), dev(caches), dev(base.block_table), dev(base.cache_seqlens))
    assert out.shape == (layers, b, s_q, h_q, 512) and lse.shape == (layers, b, h_q, s_q)
    for i in range(layers):
        out_ref, lse_ref = flash_mla_with_kvcache_reference(qs[i], caches[i], base.block_table, base.cache_seqlens,
                                                            512, causal=True)
        assert_mla_close(np.asarray(out[i]), np.asarray(lse[i]), out_ref, lse_ref, std=base.std,
                         msg=f"{loop} loop, layer {i}: {context(per_layer[i], True, 'layers')}")


def relayout(layer, base):
    """`layer`'s keys placed on `base`'s pages (same lengths), NaN everywhere else."""
    cache = np.full_like(base.k_cache, np.nan)
    page = base.page_block_size
    for r, n in enumerate(base.cache_seqlens.tolist()):
        for j in range(-(-n // page)):
            src = int(layer.block_table[r, j])
            dst = int(base.block_table[r, j])
            cache[dst] = layer.k_cache[src]
    return cache


def test_outside_jit(gpu):
    inp = make_decode_inputs(4, 1, 16, mean_seqlen=2000, varlen=True, seed=case_seed("eager"))
    q, k_cache, block_table, seqlens = put(inp, gpu)
    sched, splits = mj.get_mla_metadata(seqlens, 16, 1)
    out, lse = mj.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched, splits, causal=True)
    out_ref, lse_ref = reference(inp, True)
    assert_mla_close(np.asarray(out), np.asarray(lse), out_ref, lse_ref, std=inp.std, msg=context(inp, True, "eager"))


@pytest.mark.parametrize("s_q,h_q", [(1, 16), (2, 128)])
def test_agrees_with_the_eager_portable_kernel(gpu, s_q, h_q):
    """The flat entries run the kernel bodies of the eager route: with the same schedule (the
    eager call forced onto the portable family picks the same number of parts) the results
    agree to one unit in the last place of out's dtype (the two binaries come from different
    ptxas builds, which may fuse differently; the same ptxas gives the same bits)."""
    inp = make_decode_inputs(12, s_q, h_q, mean_seqlen=3000, varlen=True, seed=case_seed("bits", s_q, h_q))
    arrays = put(inp, gpu)
    sched, splits, out, lse = jitted_step(inp, True)(*arrays)
    with _select.forced("portable"):
        e_sched, e_splits = mla_cupy.get_mla_metadata(arrays[3], s_q * h_q, 1)
        e_out, e_lse = mla_cupy.flash_mla_with_kvcache(*arrays[:4], 512, e_sched, e_splits, causal=True)
    assert np.array_equal(np.asarray(sched), np.asarray(e_sched))
    assert np.array_equal(np.asarray(splits), np.asarray(e_splits))
    out, e_out = np.asarray(out).astype(np.float32), np.asarray(e_out).astype(np.float32)
    ulp = 2.0 ** -7 if inp.q.dtype.name == "bfloat16" else 2.0 ** -10
    np.testing.assert_allclose(out, e_out, rtol=ulp, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(e_lse), rtol=1e-6, atol=0)
    print(f"jit vs eager portable: out bitwise equal {np.array_equal(out, e_out)}, "
          f"max |diff| {np.max(np.abs(out - e_out)):.3g}")


def test_device_info_agrees_with_the_library(gpu):
    from mla_cupy import _launch

    info = mj.device_info()
    ordinal = getattr(gpu, "local_hardware_id", None)
    assert info == _launch.device_info(gpu.id if ordinal is None else ordinal)
    assert info.cc >= 80 and info.sms > 0
