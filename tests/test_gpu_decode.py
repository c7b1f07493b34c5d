"""GPU lane: ``get_mla_metadata`` and ``flash_mla_with_kvcache`` against the float64 reference.

Inputs are built the FlashMLA way (``mla_cupy.testing.make_decode_inputs``: random values,
shuffled pages, NaN in every slot that must not be read, sentinel block ids) and are fresh on
every run. Every failure message carries the case's seed and the run's base seed; set
``MLA_CUPY_TEST_SEED`` to the base seed to rerun the same inputs.
"""

import os
import zlib

import numpy as np
import pytest

import cupy

# conftest.py skips every test here, with the reason, where no usable GPU exists (and fails
# them instead under --require-gpu).
pytestmark = pytest.mark.gpu

from mla_cupy import flash_mla_with_kvcache, get_mla_metadata  # noqa: E402
from mla_cupy.reference import flash_mla_with_kvcache_reference  # noqa: E402
from mla_cupy import _select  # noqa: E402
from mla_cupy.scheduler import schedule  # noqa: E402
from mla_cupy.support import DTYPES, HEAD_DIMS  # noqa: E402
from mla_cupy.testing import assert_mla_close, make_decode_inputs  # noqa: E402

PAGE_SIZES = (1, 7, 16, 64, 256)
BASE_SEED = int(os.environ.get("MLA_CUPY_TEST_SEED", np.random.SeedSequence().entropy % (1 << 31)))


def case_seed(*tags):
    """A seed for one case, derived from the run's base seed and the case's tags."""
    return (BASE_SEED + zlib.crc32(repr(tags).encode())) % (1 << 31)


def describe(inp, causal, label=""):
    b, s_q, h_q, d = inp.q.shape
    lens = inp.cache_seqlens.tolist()
    shown = lens if len(lens) <= 8 else lens[:8] + ["..."]
    return (f"[{label}] seed={inp.seed} (rerun with MLA_CUPY_TEST_SEED={BASE_SEED}) b={b} "
            f"s_q={s_q} h_q={h_q} h_kv={inp.k_cache.shape[2]} d={d} dv={inp.head_dim_v} "
            f"page={inp.page_block_size} dtype={inp.q.dtype.name} std={inp.std} "
            f"causal={causal} seqlens={shown}")


def to_device(inp):
    return tuple(cupy.asarray(x) for x in (inp.q, inp.k_cache, inp.block_table,
                                            inp.cache_seqlens))


def metadata_for(inp, seqlens_dev):
    _, s_q, h_q, _ = inp.q.shape
    h_kv = inp.k_cache.shape[2]
    return get_mla_metadata(seqlens_dev, s_q * h_q // h_kv, h_kv)


def poison_pool(*shapes_and_dtypes):
    """Leave NaN-filled blocks of the output sizes in CuPy's pool, so that outputs the library
    allocates most likely start as NaN rather than as zeros or stale results."""
    blocks = [cupy.full(shape, np.nan, dtype=dtype) for shape, dtype in shapes_and_dtypes]
    cupy.cuda.Device().synchronize()
    del blocks


def decode(inp, causal, dev, meta=None, softmax_scale=None, buffers=False, **kwargs):
    """Run one decode call on device inputs ``dev``; return (out, lse) on the host."""
    q, k_cache, block_table, seqlens = dev
    if meta is None:
        meta = metadata_for(inp, seqlens)
    b, s_q, h_q, _ = inp.q.shape
    out_shape, lse_shape = (b, s_q, h_q, inp.head_dim_v), (b, h_q, s_q)
    if buffers:
        kwargs["out"] = cupy.full(out_shape, np.nan, dtype=q.dtype)
        kwargs["lse"] = cupy.full(lse_shape, np.nan, dtype=np.float32)
    else:
        poison_pool((out_shape, q.dtype), (lse_shape, np.float32))
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, inp.head_dim_v,
                                      *meta, softmax_scale=softmax_scale, causal=causal,
                                      **kwargs)
    if buffers:
        assert out.data.ptr == kwargs["out"].data.ptr, "out= buffer not returned"
        assert lse.data.ptr == kwargs["lse"].data.ptr, "lse= buffer not returned"
    assert isinstance(out, cupy.ndarray) and isinstance(lse, cupy.ndarray)
    assert out.shape == out_shape and out.dtype == q.dtype
    assert lse.shape == lse_shape and lse.dtype == np.float32
    cupy.cuda.Device().synchronize()
    return out.get(), lse.get()


def assert_inputs_unchanged(inp, dev, context):
    for name, host, device in zip(("q", "k_cache", "block_table", "cache_seqlens"),
                                  (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens), dev):
        # Compare the bits (NaN included) without copying gigabytes into bytes objects.
        bits = f"u{host.dtype.itemsize}"
        assert np.array_equal(device.get().view(bits), host.view(bits)), \
            f"{name} was modified: {context}"


def check_case(inp, causal, label, softmax_scale=None, **kwargs):
    """Decode ``inp`` on the GPU, check the inputs are untouched, compare with the reference."""
    context = describe(inp, causal, label)
    dev = to_device(inp)
    out, lse = decode(inp, causal, dev, softmax_scale=softmax_scale, **kwargs)
    assert_inputs_unchanged(inp, dev, context)
    out_ref, lse_ref = flash_mla_with_kvcache_reference(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, inp.head_dim_v,
        softmax_scale=softmax_scale, causal=causal)
    assert_mla_close(out, lse, out_ref, lse_ref, std=inp.std, msg=context)


# ---------------------------------------------------------------------------------------------
# Accuracy


@pytest.mark.parametrize("case", range(16))
def test_random_shapes(case):
    rng = np.random.default_rng(case_seed("random", case))
    head_dim, head_dim_v = HEAD_DIMS[int(rng.integers(len(HEAD_DIMS)))]
    h_kv = int(rng.choice([1, 1, 2]))
    h_q = int(rng.choice([16, 32, 64, 128]))
    s_q = int(rng.choice([1, 1, 2, 3, 4, 8]))
    page = int(rng.choice(PAGE_SIZES))
    batch = int(rng.integers(1, 9))
    specials = [0, 1, page - 1, page, page + 1, 63, 64, 65]
    seqlens = [int(rng.choice(specials)) if rng.random() < 0.3 else int(rng.integers(1, 2500))
               for _ in range(batch)]
    inp = make_decode_inputs(batch, s_q, h_q, h_kv=h_kv, head_dim=head_dim,
                             head_dim_v=head_dim_v, page_block_size=page, seqlens=seqlens,
                             dtype=DTYPES[int(rng.integers(len(DTYPES)))],
                             std=float(rng.choice([0.1, 1.0])),
                             seed=int(rng.integers(1 << 31)))
    check_case(inp, bool(rng.integers(2)), f"random {case}", buffers=case % 3 == 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_boundary_seqlens(page, causal):
    seqlens = sorted({0, 1, page - 1, page, page + 1, 63, 64, 65, 129, 1000})
    inp = make_decode_inputs(len(seqlens), 2, 16, page_block_size=page, seqlens=seqlens,
                             seed=case_seed("boundary", page, causal))
    check_case(inp, causal, "boundary seqlens")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s_q", range(1, 17))
def test_query_lengths(s_q, causal):
    rng = np.random.default_rng(case_seed("s_q", s_q, causal))
    seqlens = rng.integers(max(s_q - 1, 0), 700, size=2)
    inp = make_decode_inputs(2, s_q, 32 if s_q % 2 else 16, page_block_size=64, seqlens=seqlens,
                             dtype=DTYPES[s_q % 2], seed=int(rng.integers(1 << 31)))
    check_case(inp, causal, "s_q sweep")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h_kv", [1, 2])
@pytest.mark.parametrize("dims", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_head_dims(dtype, dims, h_kv, causal):
    rng = np.random.default_rng(case_seed("grid", dtype, dims, h_kv, causal))
    inp = make_decode_inputs(3, 2, 32, h_kv=h_kv, head_dim=dims[0], head_dim_v=dims[1],
                             page_block_size=64, seqlens=rng.integers(1, 800, size=3),
                             dtype=dtype, seed=int(rng.integers(1 << 31)))
    check_case(inp, causal, "dtype/dims grid")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("std", [0.1, 1.0])
def test_data_scale(std, dtype):
    inp = make_decode_inputs(4, 2, 64, page_block_size=64, mean_seqlen=1500, varlen=True,
                             std=std, dtype=dtype, seed=case_seed("std", std, dtype))
    check_case(inp, True, "data scale")


@pytest.mark.parametrize("h_q", [16, 64, 128])
def test_maxima_that_jump_late(h_q):
    """A few keys, late in each request, score far above every earlier one for some query rows
    (jumps of about 10 to 80 in log2 units), so the softmax references move in late tiles, in either
    tile of a pair: a stale reference shows up as an error of 2^8 or more in those rows."""
    rng = np.random.default_rng(case_seed("jumps", h_q))
    inp = make_decode_inputs(2, 1, h_q, page_block_size=64, seqlens=[3000, 2950],
                             seed=int(rng.integers(1 << 31)))
    page = inp.page_block_size
    for b in range(2):
        head = int(rng.integers(h_q))
        q_row = inp.q[b, 0, head].astype(np.float64)
        for token, gain in ((200, 30.0), (1100, 60.0), (2100, 120.0), (2900, 240.0)):
            block = inp.block_table[b, token // page]
            inp.k_cache[block, token % page, 0] = (gain * q_row).astype(inp.k_cache.dtype)
    check_case(inp, False, "late jumps of the row maxima")


def test_custom_softmax_scale():
    inp = make_decode_inputs(3, 1, 64, page_block_size=16, mean_seqlen=900, varlen=True,
                             seed=case_seed("scale"))
    check_case(inp, False, "softmax_scale 0.07", softmax_scale=0.07)


def test_batch_larger_than_sm_count():
    seqlens = np.random.default_rng(case_seed("b133")).normal(1024, 256, size=133)
    seqlens = np.maximum(seqlens, 1).astype(np.int64)
    seqlens[::17] = 0
    inp = make_decode_inputs(133, 1, 16, page_block_size=64, seqlens=seqlens,
                             seed=case_seed("b133", "inputs"))
    check_case(inp, True, "b=133")


def test_large_batch_many_rows():
    inp = make_decode_inputs(300, 2, 128, page_block_size=16, mean_seqlen=256, varlen=True,
                             dtype="float16", seed=case_seed("b300"))
    check_case(inp, True, "b=300 s_q=2 h_q=128", buffers=True)


def test_one_million_tokens():
    inp = make_decode_inputs(1, 1, 128, page_block_size=64, seqlens=[1 << 20],
                             seed=case_seed("1M"))
    # The reference walks the keys in chunks: a few seconds and a few hundred MB of float64.
    check_case(inp, True, "b=1, 1M tokens")


# ---------------------------------------------------------------------------------------------
# API behaviour


def test_out_and_lse_buffers_are_written_and_returned():
    inp = make_decode_inputs(3, 2, 32, page_block_size=64, seqlens=[0, 70, 300],
                             seed=case_seed("buffers"))
    dev = to_device(inp)
    meta = metadata_for(inp, dev[3])
    out_buf = cupy.full((3, 2, 32, 512), np.nan, dtype=dev[0].dtype)
    lse_buf = cupy.full((3, 32, 2), np.nan, dtype=np.float32)
    out, lse = flash_mla_with_kvcache(*dev, inp.head_dim_v, *meta, causal=True,
                                      out=out_buf, lse=lse_buf)
    assert out.data.ptr == out_buf.data.ptr and lse.data.ptr == lse_buf.data.ptr
    cupy.cuda.Device().synchronize()
    out_ref, lse_ref = flash_mla_with_kvcache_reference(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512, causal=True)
    assert_mla_close(out_buf.get(), lse_buf.get(), out_ref, lse_ref,
                     msg=describe(inp, True, "out=/lse="))
    # Request 0 is empty: written as 0 and +inf, not left as the NaN poison.
    assert (out_buf[0].get().astype(np.float32) == 0).all()
    assert np.isposinf(lse_buf[0].get()).all()


def test_metadata_is_reused_across_calls():
    seqlens = [5, 64, 1000, 4097]
    first = make_decode_inputs(4, 2, 64, page_block_size=64, seqlens=seqlens,
                               seed=case_seed("reuse", 0))
    second = make_decode_inputs(4, 2, 64, page_block_size=64, seqlens=seqlens,
                                seed=case_seed("reuse", 1))
    dev1, dev2 = to_device(first), to_device(second)
    meta = metadata_for(first, dev1[3])
    kept = [m.get() for m in meta]
    for inp, dev, causal in ((first, dev1, True), (second, dev2, True), (first, dev1, False)):
        context = describe(inp, causal, "metadata reuse")
        out, lse = decode(inp, causal, dev, meta=meta)
        out_ref, lse_ref = flash_mla_with_kvcache_reference(
            inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512, causal=causal)
        assert_mla_close(out, lse, out_ref, lse_ref, msg=context)
    for before, after in zip(kept, meta):
        np.testing.assert_array_equal(before, after.get(), err_msg="decode modified metadata")


def test_repeated_calls_are_deterministic():
    inp = make_decode_inputs(5, 2, 128, page_block_size=64, mean_seqlen=3000, varlen=True,
                             seed=case_seed("determinism"))
    dev = to_device(inp)
    meta = metadata_for(inp, dev[3])
    first = decode(inp, True, dev, meta=meta)
    second = decode(inp, True, dev, meta=meta)
    assert first[0].tobytes() == second[0].tobytes(), describe(inp, True, "determinism")
    assert first[1].tobytes() == second[1].tobytes(), describe(inp, True, "determinism")


def test_explicit_and_current_streams():
    inp = make_decode_inputs(4, 1, 64, page_block_size=16, mean_seqlen=2000, varlen=True,
                             seed=case_seed("streams"))
    dev = to_device(inp)
    cupy.cuda.Device().synchronize()  # uploads done before other streams read them
    out_ref, lse_ref = flash_mla_with_kvcache_reference(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512)
    stream = cupy.cuda.Stream(non_blocking=True)
    meta = get_mla_metadata(dev[3], 64, 1, stream=stream)
    out, lse = flash_mla_with_kvcache(*dev, 512, *meta, stream=stream)
    stream.synchronize()
    assert_mla_close(out.get(), lse.get(), out_ref, lse_ref,
                     msg=describe(inp, False, "stream="))
    other = cupy.cuda.Stream(non_blocking=True)
    with other:
        meta = get_mla_metadata(dev[3], 64, 1)
        out, lse = flash_mla_with_kvcache(*dev, 512, *meta)
    other.synchronize()
    assert_mla_close(out.get(), lse.get(), out_ref, lse_ref,
                     msg=describe(inp, False, "current stream"))


def test_strided_inputs():
    """q padded along its rows, k_cache one head of a two-head pool, block_table a column slice:
    the kernel must follow every stride, not assume packed arrays."""
    inp = make_decode_inputs(3, 2, 32, page_block_size=16, seqlens=[5, 300, 777],
                             seed=case_seed("strides"))
    q_big = cupy.full((3, 2, 32, 640), np.nan, dtype=inp.q.dtype)
    q_big[..., :576] = cupy.asarray(inp.q)
    q = q_big[..., :576]
    pool = cupy.full(inp.k_cache.shape[:2] + (2, 576), np.nan, dtype=inp.k_cache.dtype)
    pool[:, :, 1:2] = cupy.asarray(inp.k_cache)
    k_cache = pool[:, :, 1:2]
    bt_big = cupy.full((3, inp.block_table.shape[1] + 5), -7, dtype=np.int32)
    bt_big[:, 2:2 + inp.block_table.shape[1]] = cupy.asarray(inp.block_table)
    block_table = bt_big[:, 2:2 + inp.block_table.shape[1]]
    assert not (q.flags.c_contiguous or k_cache.flags.c_contiguous or block_table.flags.c_contiguous)
    seqlens = cupy.asarray(inp.cache_seqlens)
    meta = get_mla_metadata(seqlens, 64, 1)
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, *meta, causal=True)
    out_ref, lse_ref = flash_mla_with_kvcache_reference(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512, causal=True)
    assert_mla_close(out.get(), lse.get(), out_ref, lse_ref, msg=describe(inp, True, "strided"))


def test_validate_flag_rejects_bad_device_data():
    inp = make_decode_inputs(3, 1, 16, page_block_size=16, seqlens=[10, 40, 100],
                             seed=case_seed("validate-bad"))
    q, k_cache, block_table, seqlens = to_device(inp)
    meta = get_mla_metadata(seqlens, 16, 1)
    bad = seqlens.copy()
    bad[1] = -3
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\]"):
        flash_mla_with_kvcache(q, k_cache, block_table, bad, 512, *meta, validate=True)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\]"):
        get_mla_metadata(bad, 16, 1, validate=True)
    table = block_table.copy()
    table[2, 3] = k_cache.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[2, 3\]"):
        flash_mla_with_kvcache(q, k_cache, table, seqlens, 512, *meta, validate=True)
    other = cupy.asarray(np.array([100, 40, 10], dtype=np.int32))
    stale = get_mla_metadata(other, 16, 1)
    with pytest.raises(ValueError, match="tile_scheduler_metadata|num_splits"):
        flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, *stale, validate=True)


def test_validate_flag_accepts_good_inputs():
    inp = make_decode_inputs(3, 1, 16, page_block_size=7, seqlens=[0, 6, 50],
                             seed=case_seed("validate"))
    check_case(inp, True, "validate=True", validate=True)


# ---------------------------------------------------------------------------------------------
# Scheduler on the GPU


def device_sm_count():
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    return int(props["multiProcessorCount"])


@pytest.mark.parametrize("s_q,h_q,h_kv", [(1, 128, 1), (2, 128, 1), (1, 16, 1), (4, 64, 2),
                                          (16, 128, 1)])
def test_metadata_matches_host_scheduler(s_q, h_q, h_kv):
    rng = np.random.default_rng(case_seed("metadata", s_q, h_q, h_kv))
    batches = [
        [0],
        [1],
        [1 << 20],
        [4096] * 133,
        np.maximum(rng.normal(4096, 1024, size=128), 1),
        rng.choice([0, 1, 63, 64, 65, 4096, 1 << 20], size=300),
        rng.integers(0, 100000, size=int(rng.integers(1, 40))),
        [8192] * 4,  # fewer requests than parts: the smaller payload
        [64, 4160],
        rng.integers(0, 200000, size=int(rng.integers(1, 12))),
        rng.integers(0, 3000, size=9000),  # past the requests staged in shared memory
    ]
    rows = s_q * h_q // h_kv
    parts = _select.sm_parts(cupy.cuda.runtime.getDevice(), rows, h_kv)
    for lens in batches:
        lens = np.asarray(lens, dtype=np.int32)
        meta, splits = get_mla_metadata(cupy.asarray(lens), rows, h_kv, h_q)
        assert isinstance(meta, cupy.ndarray) and isinstance(splits, cupy.ndarray)
        assert meta.dtype == np.int32 and splits.dtype == np.int32
        want_meta, want_splits = schedule(lens, parts)
        context = f"b={lens.size} s_q={s_q} h_q={h_q} h_kv={h_kv} parts={parts}"
        np.testing.assert_array_equal(meta.get(), want_meta, err_msg=context)
        np.testing.assert_array_equal(splits.get(), want_splits, err_msg=context)
