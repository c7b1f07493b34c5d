"""CPU lane: the float64 reference, the numerical-contract comparison and the input builder."""

import itertools

import ml_dtypes
import numpy as np
import pytest

from mla_cupy import reference
from mla_cupy.reference import _brute_force_reference, flash_mla_with_kvcache_reference
from mla_cupy.support import DTYPES, HEAD_DIMS
from mla_cupy.testing import (
    BLOCK_TABLE_SENTINEL,
    CompareReport,
    assert_mla_close,
    compare_mla,
    make_decode_inputs,
)

pytestmark = pytest.mark.cpu

PAGE_SIZES = (1, 3, 16, 64)


def _special_seqlens(page):
    """Lengths around page and scheduling-block boundaries, zero included."""
    return sorted({0, 1, max(page - 1, 0), page, page + 1, 63, 64, 65})


def _run_both(inp, causal, softmax_scale=None):
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, inp.head_dim_v)
    fast = flash_mla_with_kvcache_reference(*args, softmax_scale=softmax_scale, causal=causal)
    slow = _brute_force_reference(*args, softmax_scale=softmax_scale, causal=causal)
    return fast, slow


def _check_same(fast, slow, context):
    (out, lse), (out_bf, lse_bf) = fast, slow
    assert out.dtype == np.float64 and lse.dtype == np.float64, context
    assert out.shape == out_bf.shape and lse.shape == lse_bf.shape, context
    assert np.isfinite(out).all(), f"NaN/inf leaked into out: {context}"
    assert not np.isnan(lse).any(), f"NaN leaked into lse: {context}"
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse_bf), err_msg=context)
    assert (lse[np.isinf(lse)] > 0).all(), context
    np.testing.assert_allclose(out, out_bf, rtol=1e-10, atol=1e-13, err_msg=context)
    finite = np.isfinite(lse_bf)
    np.testing.assert_allclose(lse[finite], lse_bf[finite], rtol=1e-12, atol=1e-13,
                               err_msg=context)
    # A row that sees no key: out 0 and lse +inf.
    empty = np.isinf(lse).transpose(0, 2, 1)  # [b, s_q, h_q]
    assert (out[empty] == 0).all(), context


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("h_kv", [1, 2])
@pytest.mark.parametrize("dims", HEAD_DIMS)
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_vectorised_matches_brute_force(page, dims, h_kv, causal):
    head_dim, head_dim_v = dims
    rng = np.random.default_rng(1000 * page + head_dim + 7 * h_kv + int(causal))
    special = _special_seqlens(page)
    for trial in range(2):
        s_q = int(rng.integers(1, 5))
        h_q = h_kv * int(rng.choice([1, 2, 3]))
        batch = int(rng.integers(1, 4))
        seqlens = rng.choice(special + [int(rng.integers(0, 3 * page + 70))], size=batch)
        inp = make_decode_inputs(batch, s_q, h_q, h_kv=h_kv, head_dim=head_dim,
                                 head_dim_v=head_dim_v, page_block_size=page,
                                 seqlens=seqlens, dtype=DTYPES[trial % 2],
                                 seed=int(rng.integers(1 << 31)))
        context = (f"page={page} dims={dims} h_kv={h_kv} causal={causal} s_q={s_q} "
                   f"h_q={h_q} seqlens={seqlens.tolist()} seed={inp.seed}")
        _check_same(*_run_both(inp, causal), context)


@pytest.mark.parametrize("page", PAGE_SIZES)
def test_every_special_length_in_one_batch(page):
    seqlens = _special_seqlens(page)
    for causal, s_q in itertools.product([False, True], [1, 3]):
        inp = make_decode_inputs(len(seqlens), s_q, 2, head_dim=320, head_dim_v=256,
                                 page_block_size=page, seqlens=seqlens, seed=page + s_q)
        _check_same(*_run_both(inp, causal), f"page={page} causal={causal} s_q={s_q}")


def test_chunked_online_softmax_matches(monkeypatch):
    inp = make_decode_inputs(3, 2, 4, h_kv=2, head_dim=512, head_dim_v=512,
                             page_block_size=3, seqlens=[50, 0, 31], seed=5)
    for chunk in (1, 4, 7, 100):
        monkeypatch.setattr(reference, "_KEY_CHUNK", chunk)
        for causal in (False, True):
            _check_same(*_run_both(inp, causal), f"chunk={chunk} causal={causal}")


def test_float32_input_and_custom_scale():
    inp = make_decode_inputs(2, 2, 4, head_dim=320, head_dim_v=256, page_block_size=16,
                             seqlens=[40, 17], seed=11)
    q32 = inp.q.astype(np.float32)
    k32 = inp.k_cache.astype(np.float32)
    args = (q32, k32, inp.block_table, inp.cache_seqlens, 256)
    for scale in (None, 0.3):
        fast = flash_mla_with_kvcache_reference(*args, softmax_scale=scale, causal=True)
        slow = _brute_force_reference(*args, softmax_scale=scale, causal=True)
        _check_same(fast, slow, f"scale={scale}")
    # Same values in bf16 and in float32 give the same float64 result.
    out_bf16, _ = flash_mla_with_kvcache_reference(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 256)
    out_f32, _ = flash_mla_with_kvcache_reference(*args)
    np.testing.assert_array_equal(out_bf16, out_f32)


def test_default_scale_is_inverse_sqrt_head_dim():
    inp = make_decode_inputs(2, 1, 2, head_dim=576, head_dim_v=512, page_block_size=64,
                             seqlens=[70, 3], seed=3)
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512)
    default = flash_mla_with_kvcache_reference(*args)
    explicit = flash_mla_with_kvcache_reference(*args, softmax_scale=576 ** -0.5)
    np.testing.assert_array_equal(default[0], explicit[0])
    np.testing.assert_array_equal(default[1], explicit[1])


def test_values_are_the_first_head_dim_v_columns():
    # One key: the output is exactly that key's first head_dim_v columns, lse = scaled q.k.
    inp = make_decode_inputs(1, 1, 1, head_dim=576, head_dim_v=512, page_block_size=16,
                             seqlens=[1], seed=9)
    out, lse = flash_mla_with_kvcache_reference(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512)
    key = inp.k_cache[inp.block_table[0, 0], 0, 0].astype(np.float64)
    np.testing.assert_allclose(out[0, 0, 0], key[:512], rtol=1e-14)
    q = inp.q[0, 0, 0].astype(np.float64)
    np.testing.assert_allclose(lse[0, 0, 0], np.dot(q, key) * 576 ** -0.5, rtol=1e-12)


def test_causal_rows_without_keys_and_bottom_right_alignment():
    # s_q = 4 over 2 keys: queries 0 and 1 see nothing, query 2 sees key 0, query 3 both.
    inp = make_decode_inputs(1, 4, 2, head_dim=320, head_dim_v=256, page_block_size=1,
                             seqlens=[2], seed=21)
    out, lse = flash_mla_with_kvcache_reference(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 256, causal=True)
    assert np.isposinf(lse[0, :, :2]).all()
    assert (out[0, :2] == 0).all()
    assert np.isfinite(lse[0, :, 2:]).all()
    key0 = inp.k_cache[inp.block_table[0, 0], 0, 0, :256].astype(np.float64)
    np.testing.assert_allclose(out[0, 2, :], np.broadcast_to(key0, (2, 256)), rtol=1e-14)
    # Non-causal: every query sees both keys.
    _, lse_all = flash_mla_with_kvcache_reference(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 256, causal=False)
    assert np.isfinite(lse_all).all()


def test_poisoned_slots_and_sentinels_never_matter():
    inp = make_decode_inputs(4, 2, 4, h_kv=2, head_dim=512, head_dim_v=512, page_block_size=16,
                             seqlens=[0, 5, 16, 33], seed=4)
    args = (inp.block_table, inp.cache_seqlens, 512)
    out, lse = flash_mla_with_kvcache_reference(inp.q, inp.k_cache, *args, causal=True)
    assert np.isfinite(out).all() and not np.isnan(lse).any()
    # Replace every never-read slot with other garbage: the result must not move.
    other = inp.k_cache.copy()
    other[np.isnan(other.astype(np.float32))] = 1e4
    out2, lse2 = flash_mla_with_kvcache_reference(inp.q, other, *args, causal=True)
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(lse, lse2)


def test_reference_accepts_device_like_arrays():
    class FakeDeviceArray:
        def __init__(self, value):
            self._value = value

        def get(self):
            return self._value

    inp = make_decode_inputs(2, 1, 2, head_dim=320, head_dim_v=256, page_block_size=7,
                             seqlens=[9, 20], seed=8)
    plain = flash_mla_with_kvcache_reference(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 256)
    wrapped = flash_mla_with_kvcache_reference(
        FakeDeviceArray(inp.q), FakeDeviceArray(inp.k_cache), FakeDeviceArray(inp.block_table),
        FakeDeviceArray(inp.cache_seqlens), 256)
    np.testing.assert_array_equal(plain[0], wrapped[0])


def test_reference_rejects_bad_inputs():
    inp = make_decode_inputs(2, 1, 2, head_dim=320, head_dim_v=256, page_block_size=16,
                             seqlens=[20, 40], seed=2)
    q, k, table, lens = inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens
    ref = flash_mla_with_kvcache_reference
    with pytest.raises(TypeError, match="q"):
        ref(q.astype(np.int32), k, table, lens, 256)
    with pytest.raises(TypeError, match="block_table"):
        ref(q, k, table.astype(np.float32), lens, 256)
    with pytest.raises(ValueError, match="q"):
        ref(q[0], k, table, lens, 256)
    with pytest.raises(ValueError, match="head dim"):
        ref(q[..., :256], k, table, lens, 256)
    with pytest.raises(ValueError, match="multiple"):
        ref(np.concatenate([q, q[:, :, :1]], axis=2), k[:, :, :1].repeat(2, axis=2), table,
            lens, 256)
    with pytest.raises(ValueError, match="head_dim_v"):
        ref(q, k, table, lens, 321)
    with pytest.raises(TypeError, match="head_dim_v"):
        ref(q, k, table, lens, 256.0)
    with pytest.raises(ValueError, match="cache_seqlens"):
        ref(q, k, table, lens[:1], 256)
    with pytest.raises(ValueError, match="cache_seqlens"):
        ref(q, k, table, np.array([-1, 4], np.int32), 256)
    with pytest.raises(ValueError, match="block_table"):
        ref(q, k, table, np.array([20, 16 * table.shape[1] + 1], np.int32), 256)
    bad = table.copy()
    bad[1, 0] = k.shape[0]
    with pytest.raises(ValueError, match="block_table"):
        ref(q, k, bad, lens, 256)
    with pytest.raises(ValueError, match="softmax_scale"):
        ref(q, k, table, lens, 256, softmax_scale=float("nan"))


# ---------------------------------------------------------------------------------------------
# compare_mla / assert_mla_close


def _reference_pair(seed=0, std=0.1):
    inp = make_decode_inputs(2, 2, 4, head_dim=320, head_dim_v=256, page_block_size=16,
                             seqlens=[0, 50], seed=seed, std=std)
    out, lse = flash_mla_with_kvcache_reference(
        inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 256, causal=True)
    assert np.isinf(lse).any() and np.isfinite(lse).any()
    return out, lse


def test_compare_passes_identical_and_rounded_data():
    out, lse = _reference_pair()
    report = compare_mla(out, lse, out, lse)
    assert isinstance(report, CompareReport) and report.passed and bool(report)
    assert report.failures == () and report.out_max_abs_error == 0 and report.out_cos_diff == 0
    # What a kernel returns: out rounded to bf16, lse to float32.
    rounded = compare_mla(out.astype(ml_dtypes.bfloat16), lse.astype(np.float32), out, lse)
    assert rounded.passed, str(rounded)
    assert_mla_close(out.astype(np.float16), lse.astype(np.float32), out, lse)


def test_compare_all_zero_output_is_safe():
    out = np.zeros((1, 1, 2, 8))
    lse = np.full((1, 2, 1), np.inf)
    report = compare_mla(out, lse, out, lse)
    assert report.passed and report.out_cos_diff == 0


def test_compare_catches_planted_nan():
    out, lse = _reference_pair()
    bad = out.copy()
    bad[1, 0, 3, 17] = np.nan
    report = compare_mla(bad, lse, out, lse)
    assert not report.passed
    assert report.out_worst.index == (1, 0, 3, 17)
    assert "non-finite" in report.failures[0]
    with pytest.raises(AssertionError, match=r"out\[1, 0, 3, 17\]"):
        assert_mla_close(bad, lse, out, lse)


def test_compare_catches_nan_in_lse():
    out, lse = _reference_pair()
    bad = lse.copy()
    bad[1, 2, 1] = np.nan
    report = compare_mla(out, bad, out, lse)
    assert not report.passed and report.lse_worst.index == (1, 2, 1)


def test_compare_catches_planted_large_error():
    out, lse = _reference_pair()
    bad = out.copy()
    bad[1, 1, 2, 100] += 0.01
    report = compare_mla(bad, lse, out, lse)
    assert not report.passed
    assert report.out_worst.index == (1, 1, 2, 100)
    assert report.out_max_abs_error == pytest.approx(0.01)
    bad_lse = lse.copy()
    bad_lse[1, 3, 0] += 0.01
    report = compare_mla(out, bad_lse, out, lse)
    assert not report.passed and report.lse_worst.index == (1, 3, 0)


def test_compare_catches_lse_inf_mismatch():
    out, lse = _reference_pair()
    finite_where_inf = lse.copy()
    finite_where_inf[0, 1, 0] = 0.0  # reference +inf (request 0 is empty)
    report = compare_mla(out, finite_where_inf, out, lse)
    assert not report.passed and report.lse_worst.index == (0, 1, 0)
    inf_where_finite = lse.copy()
    inf_where_finite[1, 0, 1] = np.inf
    assert not compare_mla(out, inf_where_finite, out, lse).passed
    minus_inf = lse.copy()
    minus_inf[0, 0, 0] = -np.inf
    assert not compare_mla(out, minus_inf, out, lse).passed


def test_compare_cosine_difference_alone_fails():
    out, lse = _reference_pair()
    # 1 % everywhere is inside rtol 2.01/128 element-wise, but a cosine difference of ~5e-5.
    report = compare_mla(out * 1.01, lse, out, lse)
    assert not report.passed
    assert len(report.failures) == 1 and "cosine" in report.failures[0]


def test_compare_absolute_terms_widen_with_std():
    rng = np.random.default_rng(0)
    out = rng.normal(0, 0.05, size=(1, 2, 4, 256))
    out[0, 1, 2, 3] = 0.0
    lse = np.full((1, 4, 2), 3.0)
    lse[0, 2, 1] = 0.0
    bad = out.copy()
    bad[0, 1, 2, 3] = 3e-3  # above 8e-4 (std 0.1), below 8e-3 (std 1)
    assert not compare_mla(bad, lse, out, lse, std=0.1).passed
    assert compare_mla(bad, lse, out, lse, std=1.0).passed
    bad_lse = lse.copy()
    bad_lse[0, 2, 1] = 5e-5  # above 1e-5 (std 0.1), below 1e-3 (std 1)
    assert not compare_mla(out, bad_lse, out, lse, std=0.1).passed
    assert compare_mla(out, bad_lse, out, lse, std=1.0).passed


def test_compare_shape_mismatch_and_bad_arguments():
    out, lse = _reference_pair()
    assert not compare_mla(out[:1], lse, out, lse).passed
    with pytest.raises(ValueError, match="std"):
        compare_mla(out, lse, out, lse, std=0)
    with pytest.raises(TypeError, match="out"):
        compare_mla(out.astype(np.int32), lse, out, lse)


def test_assert_mla_close_message_names_context_and_position():
    out, lse = _reference_pair()
    bad = out.copy()
    bad[1, 0, 0, 0] += 1.0
    with pytest.raises(AssertionError) as info:
        assert_mla_close(bad, lse, out, lse, msg="seed=1234")
    text = str(info.value)
    assert text.startswith("seed=1234") and "out[1, 0, 0, 0]" in text and "reference" in text


def test_compare_copies_device_like_arrays():
    class FakeDeviceArray:
        def __init__(self, value):
            self.value = value

        def get(self):
            return self.value

    out, lse = _reference_pair()
    assert compare_mla(FakeDeviceArray(out), FakeDeviceArray(lse), out, lse).passed


# ---------------------------------------------------------------------------------------------
# make_decode_inputs


def _check_layout(inp):
    b, s_q, h_q, d = inp.q.shape
    num_blocks, page, h_kv, kd = inp.k_cache.shape
    assert kd == d and h_q % h_kv == 0
    assert inp.block_table.dtype == np.int32 and inp.cache_seqlens.dtype == np.int32
    assert inp.block_table.shape[0] == b and inp.cache_seqlens.shape == (b,)
    assert inp.page_block_size == page
    nan = np.isnan(inp.k_cache.astype(np.float32))
    assert not np.isnan(inp.q.astype(np.float32)).any()
    used = []
    for i, n in enumerate(inp.cache_seqlens.tolist()):
        pages = -(-n // page)
        row = inp.block_table[i]
        assert (row[pages:] == BLOCK_TABLE_SENTINEL).all() and pages < row.size
        ids = row[:pages]
        assert ((ids >= 0) & (ids < num_blocks)).all()
        used.extend(ids.tolist())
        tokens = nan[ids].reshape(pages * page, h_kv, d)
        assert not tokens[:n].any(), f"NaN inside request {i}"
        assert tokens[n:].all(), f"tail of request {i} not poisoned"
    assert len(used) == len(set(used)), "a block is shared by two pages"
    unused = sorted(set(range(num_blocks)) - set(used))
    assert nan[unused].all(), "unused blocks not poisoned"
    return used


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [1, 3, 16, 64, 256])
def test_make_decode_inputs_layout(page, dtype):
    inp = make_decode_inputs(5, 2, 8, h_kv=2, head_dim=576, head_dim_v=512,
                             page_block_size=page, seqlens=[0, 1, page, page + 1, 300],
                             dtype=dtype, seed=page)
    assert inp.q.shape == (5, 2, 8, 576) and inp.k_cache.shape[1:] == (page, 2, 576)
    assert inp.q.dtype.name == dtype and inp.k_cache.dtype.name == dtype
    assert inp.head_dim_v == 512 and inp.std == 0.1 and inp.seed == page
    used = _check_layout(inp)
    assert inp.k_cache.shape[0] == len(used) + 8  # the default extra blocks


def test_make_decode_inputs_shuffles_pages():
    inp = make_decode_inputs(4, 1, 16, page_block_size=16, seqlens=1000, seed=0)
    used = _check_layout(inp)
    assert used != sorted(used), "block table is not permuted"
    assert set(used) != set(range(len(used))), "unused blocks all sit at the end"


def test_make_decode_inputs_is_reproducible():
    kwargs = dict(batch=3, s_q=2, h_q=4, head_dim=320, head_dim_v=256, page_block_size=16,
                  mean_seqlen=300, varlen=True)
    a = make_decode_inputs(seed=42, **kwargs)
    b = make_decode_inputs(seed=42, **kwargs)
    c = make_decode_inputs(seed=43, **kwargs)
    for name in ("q", "k_cache", "block_table", "cache_seqlens"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert a.q.tobytes() != c.q.tobytes()
    fresh = make_decode_inputs(**kwargs)
    assert isinstance(fresh.seed, int)
    again = make_decode_inputs(seed=fresh.seed, **kwargs)
    assert fresh.k_cache.tobytes() == again.k_cache.tobytes()


def test_make_decode_inputs_values():
    inp = make_decode_inputs(2, 4, 16, page_block_size=64, seqlens=[2000, 1500], std=0.5, seed=7)
    q = inp.q.astype(np.float64)
    assert abs(q.std() - 0.5) < 0.02 and abs(q.mean()) < 0.02
    k = inp.k_cache.astype(np.float64)
    k = k[~np.isnan(k)]
    assert abs(k.std() - 0.5) < 0.01 and (k != 0).mean() > 0.99


def test_make_decode_inputs_seqlens_forms():
    assert make_decode_inputs(3, 1, 1, seqlens=77, seed=0).cache_seqlens.tolist() == [77] * 3
    assert make_decode_inputs(2, 1, 1, seqlens=(5, 0), seed=0).cache_seqlens.tolist() == [5, 0]
    assert make_decode_inputs(2, 1, 1, mean_seqlen=90, seed=0).cache_seqlens.tolist() == [90, 90]
    var = make_decode_inputs(400, 1, 1, head_dim=320, head_dim_v=256, mean_seqlen=40,
                             varlen=True, seed=1)
    lens = var.cache_seqlens
    assert lens.min() >= 1 and len(set(lens.tolist())) > 10
    assert abs(lens.mean() - 40) < 3 and abs(lens.std() - 10) < 3
    _check_layout(var)
    empty = make_decode_inputs(2, 1, 1, seqlens=0, seed=0, extra_blocks=0)
    assert empty.k_cache.shape[0] == 1 and (empty.block_table == BLOCK_TABLE_SENTINEL).all()


def test_make_decode_inputs_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch"):
        make_decode_inputs(0, 1, 1)
    with pytest.raises(ValueError, match="h_kv"):
        make_decode_inputs(1, 1, 3, h_kv=2, seqlens=1)
    with pytest.raises(ValueError, match="head_dim"):
        make_decode_inputs(1, 1, 1, head_dim=128, head_dim_v=128, seqlens=1)
    with pytest.raises(ValueError, match="page_block_size"):
        make_decode_inputs(1, 1, 1, page_block_size=512, seqlens=1)
    with pytest.raises(TypeError, match="dtype"):
        make_decode_inputs(1, 1, 1, dtype="float32", seqlens=1)
    with pytest.raises(ValueError, match="std"):
        make_decode_inputs(1, 1, 1, std=0.0, seqlens=1)
    with pytest.raises(ValueError, match="seqlens"):
        make_decode_inputs(2, 1, 1, seqlens=[1, 2, 3])
    with pytest.raises(ValueError, match="seqlens"):
        make_decode_inputs(2, 1, 1, seqlens=[1, -2])
    with pytest.raises(TypeError, match="seqlens"):
        make_decode_inputs(2, 1, 1, seqlens=[1.5, 2.0])
    with pytest.raises(TypeError, match="batch"):
        make_decode_inputs(2.0, 1, 1)
    with pytest.raises(TypeError, match="dtype"):
        make_decode_inputs(1, 1, 1, dtype=np.float32, seqlens=1)
    assert make_decode_inputs(1, 1, 1, dtype=ml_dtypes.bfloat16, seqlens=1).q.dtype.name \
        == "bfloat16"
    assert make_decode_inputs(1, 1, 1, dtype=np.float16, seqlens=1).q.dtype == np.float16
