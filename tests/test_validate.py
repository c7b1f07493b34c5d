"""Argument checks: every error names its argument, the expected and the actual value.

The validators are duck-typed, so NumPy arrays (bfloat16 from ml_dtypes) stand in for CuPy ones.
"""

import types

import ml_dtypes
import numpy as np
import pytest

from mla_cupy import _validate
from mla_cupy._env import CONFIG
from mla_cupy._validate import (
    DecodeProblem,
    check_decode_args,
    check_device_data,
    check_metadata_args,
    resolve_validate,
)
from mla_cupy.support import (
    DTYPES,
    HEAD_DIMS,
    MAX_PAGE_BLOCK_SIZE,
    MIN_PAGE_BLOCK_SIZE,
    SCHED_METADATA_SIZE,
)

pytestmark = pytest.mark.cpu

NP_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
ALIGN = 256


def aligned_empty(shape, dtype, offset_bytes=0):
    """An array whose data pointer is ALIGN-aligned plus ``offset_bytes``."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + 2 * ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN + offset_bytes
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def make_args(head_dims=HEAD_DIMS[0], dtype="bfloat16", page=64, h_kv=1, batch=2, s_q=2,
              h_q=16, max_blocks=4, num_blocks=8, parts=4):
    d, dv = head_dims
    t = NP_DTYPES[dtype]
    block_table = (np.arange(batch * max_blocks, dtype=np.int32) % num_blocks).reshape(
        batch, max_blocks)
    return dict(
        q=aligned_empty((batch, s_q, h_q, d), t),
        k_cache=aligned_empty((num_blocks, page, h_kv, d), t),
        block_table=block_table,
        cache_seqlens=np.full(batch, page * max_blocks // 2, np.int32),
        head_dim_v=dv,
        tile_scheduler_metadata=np.zeros((parts, SCHED_METADATA_SIZE), np.int32),
        num_splits=np.zeros(batch + 1, np.int32),
        softmax_scale=None,
        causal=True,
        is_fp8_kvcache=False,
        indices=None,
        out=None,
        lse=None,
    )


class FakeArray:
    """Just the attributes the validators read: no memory behind it."""

    def __init__(self, shape, dtype, strides=None, ptr=ALIGN):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        if strides is None:
            strides, step = [], self.dtype.itemsize
            for n in reversed(self.shape):
                strides.append(step)
                step *= n
            strides = tuple(reversed(strides))
        self.strides = tuple(strides)
        self.data = types.SimpleNamespace(ptr=ptr)


# --------------------------------------------------------------------------------------------
# Good inputs.


@pytest.mark.parametrize("h_kv", [1, 2])
@pytest.mark.parametrize("page", [MIN_PAGE_BLOCK_SIZE, 64, MAX_PAGE_BLOCK_SIZE])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dims", HEAD_DIMS, ids=lambda hd: f"d{hd[0]}v{hd[1]}")
def test_baseline_passes(head_dims, dtype, page, h_kv):
    num_blocks = 2 if page == MAX_PAGE_BLOCK_SIZE else 8
    args = make_args(head_dims, dtype, page, h_kv, num_blocks=num_blocks)
    p = check_decode_args(**args)
    d, dv = head_dims
    assert p == DecodeProblem(
        batch=2, s_q=2, h_q=16, h_kv=h_kv, head_dim=d, head_dim_v=dv, page_block_size=page,
        num_blocks=num_blocks, max_blocks_per_seq=4, num_sm_parts=4, dtype=dtype,
        softmax_scale=d ** -0.5, causal=True)
    assert p.ngroups == 16 // h_kv
    assert p.m == 2 * 16 // h_kv


def test_optional_outputs_and_scalars_pass():
    args = make_args()
    args.update(
        out=aligned_empty((2, 2, 16, 512), NP_DTYPES["bfloat16"]),
        lse=np.zeros((2, 16, 2), np.float32),
        softmax_scale=np.float32(0.125),
        causal=np.bool_(False),
        head_dim_v=np.int64(512),
    )
    p = check_decode_args(**args)
    assert p.softmax_scale == 0.125 and type(p.softmax_scale) is float
    assert p.causal is False and p.head_dim_v == 512 and type(p.head_dim_v) is int
    args.update(causal=1)
    assert check_decode_args(**args).causal is True


def test_strided_but_kernel_friendly_layouts_pass():
    args = make_args(batch=3, s_q=1)
    # Rows of the block table taken from a wider table.
    args["block_table"] = np.zeros((3, 10), np.int32)[:, :4]
    # q sliced out of a padded buffer: strides multiples of 16 bytes, last dim contiguous.
    args["q"] = aligned_empty((3, 1, 16, 640), NP_DTYPES["bfloat16"])[..., :576]
    # k_cache viewed out of a pool with an extra head: h_kv stride skips one head.
    args["k_cache"] = aligned_empty((8, 64, 2, 576), NP_DTYPES["bfloat16"])[:, :, :1, :]
    p = check_decode_args(**args)
    assert (p.batch, p.max_blocks_per_seq, p.h_kv) == (3, 4, 1)


def test_size_one_dimensions_ignore_strides():
    args = make_args(batch=1, s_q=1)
    args["q"] = FakeArray((1, 1, 16, 576), NP_DTYPES["bfloat16"], strides=(3, 5, 1152, 2))
    args["cache_seqlens"] = FakeArray((1,), np.int32, strides=(12,))
    check_decode_args(**args)


def test_huge_sizes_are_not_restricted():
    # 2**20 pages of 64 tokens: ~3.9e10 elements, well beyond int32 indexing.
    args = make_args(batch=4, max_blocks=2**14)
    args["k_cache"] = FakeArray((2**20, 64, 1, 576), NP_DTYPES["bfloat16"])
    args["block_table"] = FakeArray((4, 2**14), np.int32)
    p = check_decode_args(**args)
    assert p.num_blocks == 2**20


# --------------------------------------------------------------------------------------------
# Bad inputs: (id, mutation of the baseline args, exception, fragments the message must hold).


def _set(**changes):
    def mutate(args):
        for key, value in changes.items():
            args[key] = value(args) if callable(value) else value
    return mutate


BF16 = NP_DTYPES["bfloat16"]
F16 = NP_DTYPES["float16"]


def _with_ptr(x, ptr):
    return FakeArray(x.shape, x.dtype, x.strides, ptr=ptr)


def _misaligned(shape, dtype, offset_bytes):
    return lambda a: aligned_empty(shape, dtype, offset_bytes)


BAD_DECODE = [
    # not supported in this version, checked first
    ("fp8", _set(is_fp8_kvcache=True), ValueError,
     ["is_fp8_kvcache:", "fp8 KV cache is not supported in this version"]),
    ("indices", _set(indices=np.zeros((2, 2, 64), np.int32)), ValueError,
     ["indices:", "not supported in this version"]),
    # q
    ("q-list", _set(q=[[1.0]]), TypeError, ["q:", "got list"]),
    ("q-3d", _set(q=np.zeros((2, 16, 576), BF16)), ValueError,
     ["q:", "4 dimensions", "(2, 16, 576)"]),
    ("q-float32", _set(q=np.zeros((2, 2, 16, 576), np.float32)), TypeError,
     ["q:", "bfloat16 or float16", "got float32"]),
    ("q-batch0", _set(q=np.zeros((0, 2, 16, 576), BF16)), ValueError,
     ["q:", ">= 1", "(0, 2, 16, 576)"]),
    ("q-sq0", _set(q=np.zeros((2, 0, 16, 576), BF16)), ValueError, ["q:", "(2, 0, 16, 576)"]),
    ("q-headdim", _set(q=np.zeros((2, 2, 16, 128), BF16)), ValueError,
     ["q:", "head_dim", "got 128"]),
    ("q-heads-not-multiple", _set(q=aligned_empty((2, 2, 3, 576), BF16),
                                  k_cache=aligned_empty((8, 64, 2, 576), BF16)), ValueError,
     ["q:", "multiple of k_cache's h_kv (2)", "got h_q 3"]),
    ("q-last-dim-strided", _set(q=lambda a: aligned_empty((2, 2, 16, 1152), BF16)[..., ::2]),
     ValueError, ["q:", "last dimension contiguous"]),
    ("q-stride-not-16", _set(q=lambda a: aligned_empty((2, 2, 16, 580), BF16)[..., :576]),
     ValueError, ["q:", "multiple of 16 bytes", "1160"]),
    ("q-misaligned", _set(q=_misaligned((2, 2, 16, 576), BF16, 2)), ValueError,
     ["q:", "aligned to 16 bytes", "offset 2"]),
    ("q-negative-stride", _set(q=lambda a: a["q"][::-1]), ValueError,
     ["q:", "non-negative strides"]),
    ("q-shape-not-ints", _set(q=types.SimpleNamespace(shape=None, dtype=BF16, strides=())),
     TypeError, ["q:", "tuples of ints"]),
    ("q-pointer-not-int", _set(q=lambda a: _with_ptr(a["q"], "0x100")), TypeError,
     ["q:", "integer data pointer"]),
    # head_dim_v
    ("dv-mismatch", _set(head_dim_v=256), ValueError,
     ["head_dim_v:", "expected 512 for head_dim 576", "got 256"]),
    ("dv-str", _set(head_dim_v="512"), TypeError, ["head_dim_v:", "got str"]),
    ("dv-bool", _set(head_dim_v=True), TypeError, ["head_dim_v:", "bool"]),
    ("dv-float", _set(head_dim_v=512.0), TypeError, ["head_dim_v:", "float"]),
    # k_cache
    ("k-none", _set(k_cache=None), TypeError, ["k_cache:", "NoneType"]),
    ("k-dtype", _set(k_cache=np.zeros((8, 64, 1, 576), F16)), TypeError,
     ["k_cache: expected dtype bfloat16 (same as q), got float16"]),
    ("k-3d", _set(k_cache=np.zeros((8, 64, 576), BF16)), ValueError,
     ["k_cache:", "4 dimensions"]),
    ("k-headdim", _set(k_cache=np.zeros((8, 64, 1, 512), BF16)), ValueError,
     ["k_cache:", "576 (same as q)", "got 512"]),
    ("k-no-blocks", _set(k_cache=np.zeros((0, 64, 1, 576), BF16)), ValueError,
     ["k_cache:", "num_blocks", ">= 1"]),
    ("k-page0", _set(k_cache=np.zeros((8, 0, 1, 576), BF16)), ValueError,
     ["k_cache:", "page_block_size", f"[{MIN_PAGE_BLOCK_SIZE}, {MAX_PAGE_BLOCK_SIZE}]",
      "got 0"]),
    ("k-page-too-big", _set(k_cache=FakeArray((2, 2 * MAX_PAGE_BLOCK_SIZE, 1, 576), BF16)),
     ValueError, ["k_cache:", "page_block_size", f"got {2 * MAX_PAGE_BLOCK_SIZE}"]),
    ("k-hkv0", _set(k_cache=np.zeros((8, 64, 0, 576), BF16)), ValueError,
     ["k_cache:", "h_kv", "got 0"]),
    ("k-last-dim-strided", _set(k_cache=lambda a: aligned_empty((8, 64, 1, 1152),
                                                                BF16)[..., ::2]),
     ValueError, ["k_cache:", "last dimension contiguous"]),
    ("k-stride-not-16", _set(k_cache=FakeArray((8, 64, 1, 576), BF16,
                                               strides=(64 * 1160, 1160, 1160, 2))),
     ValueError, ["k_cache:", "multiple of 16 bytes"]),
    ("k-misaligned", _set(k_cache=_misaligned((8, 64, 1, 576), BF16, 8)), ValueError,
     ["k_cache:", "aligned to 16 bytes"]),
    ("k-strides-short", _set(k_cache=types.SimpleNamespace(shape=(8, 64, 1, 576), dtype=BF16,
                                                           strides=(2,))),
     ValueError, ["k_cache:", "one stride per dimension"]),
    # block_table
    ("bt-int64", _set(block_table=np.zeros((2, 4), np.int64)), TypeError,
     ["block_table: expected dtype int32, got int64"]),
    ("bt-1d", _set(block_table=np.zeros(8, np.int32)), ValueError,
     ["block_table:", "2 dimensions"]),
    ("bt-rows", _set(block_table=np.zeros((3, 4), np.int32)), ValueError,
     ["block_table:", "expected 2 rows", "(3, 4)"]),
    ("bt-fortran", _set(block_table=np.asfortranarray(np.zeros((2, 4), np.int32))),
     ValueError, ["block_table:", "last dimension contiguous"]),
    ("bt-odd-row-stride", _set(block_table=FakeArray((2, 4), np.int32, strides=(18, 4))),
     ValueError, ["block_table:", "multiples of the item size 4"]),
    ("bt-misaligned", _set(block_table=FakeArray((2, 4), np.int32, ptr=ALIGN + 2)), ValueError,
     ["block_table:", "aligned to 4 bytes", "offset 2"]),
    ("bt-array-like", _set(block_table=[[0, 1, 2, 3], [4, 5, 6, 7]]), TypeError,
     ["block_table:", "got list"]),
    # cache_seqlens
    ("sl-int64", _set(cache_seqlens=np.zeros(2, np.int64)), TypeError,
     ["cache_seqlens: expected dtype int32, got int64"]),
    ("sl-2d", _set(cache_seqlens=np.zeros((2, 1), np.int32)), ValueError,
     ["cache_seqlens:", "1 dimension ["]),
    ("sl-length", _set(cache_seqlens=np.zeros(3, np.int32)), ValueError,
     ["cache_seqlens:", "expected shape (2,)", "got (3,)"]),
    ("sl-strided", _set(cache_seqlens=np.zeros(4, np.int32)[::2]), ValueError,
     ["cache_seqlens:", "C-contiguous"]),
    ("sl-misaligned", _set(cache_seqlens=FakeArray((2,), np.int32, ptr=ALIGN + 1)), ValueError,
     ["cache_seqlens:", "aligned to 4 bytes"]),
    # tile_scheduler_metadata
    ("meta-int64", _set(tile_scheduler_metadata=np.zeros((4, SCHED_METADATA_SIZE), np.int64)),
     TypeError, ["tile_scheduler_metadata: expected dtype int32, got int64"]),
    ("meta-1d", _set(tile_scheduler_metadata=np.zeros(32, np.int32)), ValueError,
     ["tile_scheduler_metadata:", "2 dimensions"]),
    ("meta-width", _set(tile_scheduler_metadata=np.zeros((4, SCHED_METADATA_SIZE - 1),
                                                         np.int32)), ValueError,
     ["tile_scheduler_metadata:", f"(4, {SCHED_METADATA_SIZE - 1})", "get_mla_metadata"]),
    ("meta-empty", _set(tile_scheduler_metadata=np.zeros((0, SCHED_METADATA_SIZE), np.int32)),
     ValueError, ["tile_scheduler_metadata:", "num_sm_parts >= 1"]),
    ("meta-fortran", _set(tile_scheduler_metadata=np.asfortranarray(
        np.zeros((4, SCHED_METADATA_SIZE), np.int32))), ValueError,
     ["tile_scheduler_metadata:", "C-contiguous"]),
    ("meta-misaligned", _set(tile_scheduler_metadata=FakeArray((4, SCHED_METADATA_SIZE), np.int32,
                                                               ptr=ALIGN + 2)),
     ValueError, ["tile_scheduler_metadata:", "aligned to 4 bytes"]),
    # num_splits
    ("splits-length", _set(num_splits=np.zeros(5, np.int32)), ValueError,
     ["num_splits:", "expected length 3 (batch + 1), got 5", "different batch"]),
    ("splits-int64", _set(num_splits=np.zeros(3, np.int64)), TypeError,
     ["num_splits: expected dtype int32, got int64"]),
    ("splits-2d", _set(num_splits=np.zeros((3, 1), np.int32)), ValueError,
     ["num_splits:", "1 dimension ["]),
    ("splits-strided", _set(num_splits=np.zeros(6, np.int32)[::2]), ValueError,
     ["num_splits:", "C-contiguous"]),
    ("splits-misaligned", _set(num_splits=FakeArray((3,), np.int32, ptr=ALIGN + 3)), ValueError,
     ["num_splits:", "aligned to 4 bytes"]),
    # scalars
    ("scale-str", _set(softmax_scale="0.1"), TypeError, ["softmax_scale:", "got str"]),
    ("scale-bool", _set(softmax_scale=True), TypeError, ["softmax_scale:", "got bool"]),
    ("scale-zero", _set(softmax_scale=0.0), ValueError,
     ["softmax_scale:", "finite positive", "got 0.0"]),
    ("scale-negative", _set(softmax_scale=-0.1), ValueError, ["softmax_scale:", "got -0.1"]),
    ("scale-nan", _set(softmax_scale=float("nan")), ValueError, ["softmax_scale:", "nan"]),
    ("scale-inf", _set(softmax_scale=float("inf")), ValueError, ["softmax_scale:", "inf"]),
    ("scale-huge-int", _set(softmax_scale=10 ** 400), ValueError,
     ["softmax_scale:", "int too large for a float"]),
    ("causal-str", _set(causal="yes"), TypeError, ["causal:", "expected a bool", "'yes'"]),
    ("causal-none", _set(causal=None), TypeError, ["causal:", "None"]),
    ("causal-two", _set(causal=2), TypeError, ["causal:", "got 2"]),
    # out
    ("out-shape", _set(out=aligned_empty((2, 2, 16, 576), BF16)), ValueError,
     ["out:", "(2, 2, 16, 512)", "got (2, 2, 16, 576)"]),
    ("out-dtype", _set(out=aligned_empty((2, 2, 16, 512), F16)), TypeError,
     ["out: expected dtype bfloat16 (same as q), got float16"]),
    ("out-not-contiguous", _set(out=lambda a: aligned_empty((2, 2, 16, 1024), BF16)[..., :512]),
     ValueError, ["out:", "C-contiguous"]),
    ("out-misaligned", _set(out=_misaligned((2, 2, 16, 512), BF16, 4)), ValueError,
     ["out:", "aligned to 16 bytes"]),
    ("out-list", _set(out=[]), TypeError, ["out:", "got list"]),
    ("out-dtype-not-numpy", _set(out=types.SimpleNamespace(
        shape=(2, 2, 16, 512), dtype=types.SimpleNamespace(name="bfloat16"),
        strides=(32768, 16384, 1024, 2))), TypeError, ["out:", "NumPy dtype"]),
    # lse
    ("lse-dtype", _set(lse=np.zeros((2, 16, 2), np.float16)), TypeError,
     ["lse: expected dtype float32, got float16"]),
    ("lse-shape", _set(lse=np.zeros((2, 2, 16), np.float32)), ValueError,
     ["lse:", "(2, 16, 2)", "got (2, 2, 16)"]),
    ("lse-not-contiguous", _set(lse=np.zeros((2, 16, 4), np.float32)[..., :2]), ValueError,
     ["lse:", "C-contiguous"]),
]


@pytest.mark.parametrize("mutate, exc, fragments",
                         [case[1:] for case in BAD_DECODE], ids=[c[0] for c in BAD_DECODE])
def test_bad_decode_args(mutate, exc, fragments):
    args = make_args()
    mutate(args)
    with pytest.raises(exc) as info:
        check_decode_args(**args)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_every_argument_named_in_some_bad_case():
    names = {"q", "k_cache", "block_table", "cache_seqlens", "head_dim_v",
             "tile_scheduler_metadata", "num_splits", "softmax_scale", "causal",
             "is_fp8_kvcache", "indices", "out", "lse"}
    named = {frag.split(":")[0] for case in BAD_DECODE for frag in case[3] if ":" in frag}
    assert names <= named


# --------------------------------------------------------------------------------------------
# get_mla_metadata arguments.


def metadata_args():
    return dict(cache_seqlens=np.full(4, 100, np.int32), num_q_tokens_per_head_k=32,
                num_heads_k=1, num_heads_q=None, is_fp8_kvcache=False, topk=None)


@pytest.mark.parametrize("changes", [
    {}, {"num_heads_q": 128, "num_heads_k": 2}, {"num_q_tokens_per_head_k": np.int32(64)},
    {"cache_seqlens": np.zeros(1, np.int32)},
])
def test_metadata_args_pass(changes):
    args = metadata_args()
    args.update(changes)
    assert check_metadata_args(**args) is None


BAD_METADATA = [
    ("fp8", {"is_fp8_kvcache": True}, ValueError,
     ["is_fp8_kvcache:", "fp8 KV cache is not supported in this version"]),
    ("topk", {"topk": 64}, ValueError, ["topk:", "sparse", "not supported in this version"]),
    ("sl-list", {"cache_seqlens": [1, 2]}, TypeError, ["cache_seqlens:", "got list"]),
    ("sl-int64", {"cache_seqlens": np.zeros(4, np.int64)}, TypeError,
     ["cache_seqlens: expected dtype int32, got int64"]),
    ("sl-2d", {"cache_seqlens": np.zeros((4, 1), np.int32)}, ValueError,
     ["cache_seqlens:", "1 dimension ["]),
    ("sl-empty", {"cache_seqlens": np.zeros(0, np.int32)}, ValueError,
     ["cache_seqlens:", "at least one entry"]),
    ("sl-strided", {"cache_seqlens": np.zeros(8, np.int32)[::2]}, ValueError,
     ["cache_seqlens:", "C-contiguous"]),
    ("sl-misaligned", {"cache_seqlens": FakeArray((4,), np.int32, ptr=ALIGN + 2)}, ValueError,
     ["cache_seqlens:", "aligned to 4 bytes"]),
    ("tokens-zero", {"num_q_tokens_per_head_k": 0}, ValueError,
     ["num_q_tokens_per_head_k:", "positive int", "got 0"]),
    ("tokens-str", {"num_q_tokens_per_head_k": "16"}, TypeError,
     ["num_q_tokens_per_head_k:", "got str"]),
    ("tokens-bool", {"num_q_tokens_per_head_k": True}, TypeError,
     ["num_q_tokens_per_head_k:", "bool"]),
    ("heads-k-zero", {"num_heads_k": 0}, ValueError, ["num_heads_k:", "got 0"]),
    ("heads-k-float", {"num_heads_k": 1.0}, TypeError, ["num_heads_k:", "got float"]),
    ("heads-q-zero", {"num_heads_q": 0}, ValueError, ["num_heads_q:", "got 0"]),
    ("heads-q-not-multiple", {"num_heads_q": 10, "num_heads_k": 4}, ValueError,
     ["num_heads_q:", "multiple of num_heads_k (4)", "got 10"]),
]


@pytest.mark.parametrize("changes, exc, fragments",
                         [case[1:] for case in BAD_METADATA], ids=[c[0] for c in BAD_METADATA])
def test_bad_metadata_args(changes, exc, fragments):
    args = metadata_args()
    args.update(changes)
    with pytest.raises(exc) as info:
        check_metadata_args(**args)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


# --------------------------------------------------------------------------------------------
# Device-data checks (opt-in; read the arrays).

UNUSED = 2147480000  # what FlashMLA's tests write past a sequence's last page


def device_problem(batch=3, page=64, max_blocks=4, num_blocks=10):
    args = make_args(batch=batch, page=page, max_blocks=max_blocks, num_blocks=num_blocks)
    return check_decode_args(**args)


def test_device_data_passes_and_ignores_unused_entries():
    p = device_problem()
    seqlens = np.array([0, 65, 256], np.int32)
    table = np.full((3, 4), UNUSED, np.int32)
    table[1, :2] = [9, 0]
    table[2, :] = [1, 2, 3, 4]
    check_device_data(table, seqlens, p)


def test_device_data_uses_get_when_present():
    class DeviceLike:
        def __init__(self, host):
            self.host = host
            self.calls = 0

        def get(self):
            self.calls += 1
            return self.host

    p = device_problem()
    seqlens = DeviceLike(np.array([1, 1, 1], np.int32))
    table = DeviceLike(np.zeros((3, 4), np.int32))
    check_device_data(table, seqlens, p)
    assert seqlens.calls == 1 and table.calls == 1


@pytest.mark.parametrize("seqlens, table_changes, fragments", [
    ([5, -1, 5], {}, ["cache_seqlens[1]:", ">= 0", "got -1"]),
    ([257, 5, 5], {}, ["cache_seqlens[0]:", "at most 256 tokens", "4 columns of 64", "got 257"]),
    ([5, 130, 5], {(1, 2): 10}, ["block_table[1, 2]:", "[0, 10)", "batch 1 uses 3 blocks",
                                 "130 tokens", "got 10"]),
    ([5, 5, 64], {(2, 0): -3}, ["block_table[2, 0]:", "got -3"]),
    ([1, 1, 1], {(0, 0): UNUSED}, ["block_table[0, 0]:", f"got {UNUSED}"]),
], ids=["negative-seqlen", "seqlen-too-long", "block-too-large", "block-negative",
        "block-sentinel-in-use"])
def test_device_data_errors(seqlens, table_changes, fragments):
    p = device_problem()
    table = np.zeros((3, 4), np.int32)
    for index, value in table_changes.items():
        table[index] = value
    with pytest.raises(ValueError) as info:
        check_device_data(table, np.array(seqlens, np.int32), p)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


# --------------------------------------------------------------------------------------------
# validate flag.


def test_resolve_validate():
    assert resolve_validate(None) is CONFIG.validate
    assert resolve_validate(True) is True
    assert resolve_validate(np.bool_(False)) is False
    with pytest.raises(TypeError, match="validate: expected True, False or None, got 'yes'"):
        resolve_validate("yes")


def test_library_code_has_no_assert():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(_validate))
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Assert)]
