"""Every argument check of the public API, and nothing else.

The checks are duck-typed: they read ``.shape``, ``.dtype``, ``.strides`` (in bytes) and the data
pointer (``x.data.ptr`` for CuPy, ``x.ctypes.data`` for NumPy), so they run on NumPy stand-ins
without a GPU. Each error names the argument, what was expected and what was given: ``TypeError``
for dtypes and objects that are not arrays, ``ValueError`` for shapes, values and memory layout.

Only :func:`check_device_data` reads array contents; it is opt-in because it costs a host sync
(see ``MLA_CUPY_VALIDATE`` and the ``validate`` argument resolved by :func:`resolve_validate`).
"""

import dataclasses
import math
import numbers
import operator

import numpy as np

from ._env import CONFIG
from .support import (
    DTYPES,
    HEAD_DIMS,
    INDEX_DTYPE,
    LSE_DTYPE,
    MAX_PAGE_BLOCK_SIZE,
    MIN_PAGE_BLOCK_SIZE,
    SCHED_METADATA_SIZE,
)

# Byte alignment the kernels' 16-byte asynchronous copies and vector stores need for q, k_cache
# and out: the data pointer and every stride of a dimension longer than one.
_VECTOR_ALIGN = 16

_SUPPORTED_HEAD_DIMS = tuple(d for d, _ in HEAD_DIMS)


@dataclasses.dataclass(frozen=True)
class DecodeProblem:
    """The sizes and options of one ``flash_mla_with_kvcache`` call, once checked."""

    batch: int
    s_q: int
    h_q: int
    h_kv: int
    head_dim: int
    head_dim_v: int
    page_block_size: int
    num_blocks: int
    max_blocks_per_seq: int
    num_sm_parts: int
    dtype: str
    softmax_scale: float
    causal: bool

    @property
    def ngroups(self):
        """Query heads sharing one KV head."""
        return self.h_q // self.h_kv

    @property
    def m(self):
        """Query rows per KV head: the s_q tokens of each of the ``ngroups`` heads."""
        return self.s_q * self.ngroups


# --------------------------------------------------------------------------------------------
# Small helpers: describing values, reading array attributes.


def _type_name(x):
    t = type(x)
    module = t.__module__
    if module in ("builtins", None):
        return t.__qualname__
    return f"{module.partition('.')[0]}.{t.__qualname__}"


def _dtype_name(dtype):
    return getattr(dtype, "name", None) or str(dtype)


def _data_ptr(x):
    ctypes_info = getattr(x, "ctypes", None)  # NumPy (whose .data is a memoryview)
    if ctypes_info is not None:
        return operator.index(ctypes_info.data)
    ptr = getattr(getattr(x, "data", None), "ptr", None)  # CuPy
    if ptr is not None:
        return operator.index(ptr)
    for interface in ("__cuda_array_interface__", "__array_interface__"):
        info = getattr(x, interface, None)
        if info is not None:
            return operator.index(info["data"][0])
    return None


def _check_array(name, x):
    """An object with integer shape and strides (one per dimension) and a NumPy dtype."""
    if not all(hasattr(x, attr) for attr in ("shape", "dtype", "strides")):
        raise TypeError(
            f"{name}: expected an array with shape, dtype and strides, got {_type_name(x)}")
    try:
        shape = tuple(operator.index(n) for n in x.shape)
        strides = tuple(operator.index(s) for s in x.strides)
    except TypeError:
        raise TypeError(
            f"{name}: expected an array whose shape and strides are tuples of ints, got "
            f"{_type_name(x)} with shape {x.shape!r} and strides {x.strides!r}") from None
    if len(strides) != len(shape) or any(n < 0 for n in shape):
        raise ValueError(
            f"{name}: expected non-negative dimensions and one stride per dimension, got shape "
            f"{shape} and strides {strides}")
    try:
        np.dtype(x.dtype)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name}: expected an array with a NumPy dtype, got {_type_name(x)} with dtype "
            f"{x.dtype!r}") from None


def _check_dtype(name, x, expected, note=""):
    got = _dtype_name(x.dtype)
    if got != expected:
        suffix = f" ({note})" if note else ""
        raise TypeError(f"{name}: expected dtype {expected}{suffix}, got {got}")


def _check_ndim(name, x, ndim, layout):
    shape = tuple(x.shape)
    if len(shape) != ndim:
        plural = "s" if ndim != 1 else ""
        raise ValueError(
            f"{name}: expected {ndim} dimension{plural} {layout}, got {len(shape)} "
            f"(shape {shape})")


def _check_shape(name, x, expected, layout):
    shape = tuple(x.shape)
    if shape != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} {layout}, got {shape}")


def _itemsize(x):
    return np.dtype(x.dtype).itemsize


def _check_strides_nonnegative(name, x):
    strides = tuple(x.strides)
    if any(s < 0 for s, n in zip(strides, x.shape) if n > 1):
        raise ValueError(f"{name}: expected non-negative strides, got strides {strides} (bytes)")


def _check_c_contiguous(name, x):
    """Row-major and dense; strides of dimensions of length one are ignored."""
    shape, strides = tuple(x.shape), tuple(x.strides)
    expected = _itemsize(x)
    for n, s in zip(reversed(shape), reversed(strides)):
        if n > 1 and s != expected:
            raise ValueError(
                f"{name}: expected a C-contiguous array, got strides {strides} (bytes) "
                f"for shape {shape}")
        expected *= n


def _check_last_dim_contiguous(name, x):
    shape, strides = tuple(x.shape), tuple(x.strides)
    if shape[-1] > 1 and strides[-1] != _itemsize(x):
        raise ValueError(
            f"{name}: expected the last dimension contiguous (stride {_itemsize(x)} bytes), "
            f"got strides {strides} (bytes)")


def _check_element_strides(name, x):
    """Every stride a whole number of elements, so kernels can index in elements."""
    itemsize = _itemsize(x)
    strides = tuple(x.strides)
    if any(s % itemsize for s, n in zip(strides, x.shape) if n > 1):
        raise ValueError(
            f"{name}: expected strides that are multiples of the item size {itemsize}, "
            f"got strides {strides} (bytes)")


def _check_vector_layout(name, x):
    """The layout the decode kernels load from: contiguous rows, 16-byte strides and pointer."""
    _check_strides_nonnegative(name, x)
    _check_last_dim_contiguous(name, x)
    strides = tuple(x.strides)
    bad = [s for s, n in zip(strides[:-1], x.shape[:-1]) if n > 1 and s % _VECTOR_ALIGN]
    if bad:
        raise ValueError(
            f"{name}: expected every stride to be a multiple of {_VECTOR_ALIGN} bytes, "
            f"got strides {strides} (bytes)")
    _check_pointer_alignment(name, x, _VECTOR_ALIGN)


def _check_pointer_alignment(name, x, align):
    try:
        ptr = _data_ptr(x)
    except (AttributeError, LookupError, TypeError, ValueError):
        raise TypeError(
            f"{name}: expected an array with an integer data pointer, got {_type_name(x)}"
        ) from None
    if ptr is not None and ptr % align:
        raise ValueError(
            f"{name}: expected a data pointer aligned to {align} bytes, got address {ptr:#x} "
            f"(offset {ptr % align}); a sliced view may need a copy")


def _check_index_vector(name, x, length, what):
    """An int32 1-D contiguous vector of the given length (None: any length >= 1)."""
    _check_array(name, x)
    _check_dtype(name, x, INDEX_DTYPE)
    _check_ndim(name, x, 1, f"[{what}]")
    n = x.shape[0]
    if length is None:
        if n < 1:
            raise ValueError(f"{name}: expected at least one entry [{what}], got shape {(n,)}")
    elif n != length:
        raise ValueError(f"{name}: expected shape ({length},) [{what}], got {(n,)}")
    _check_c_contiguous(name, x)
    _check_pointer_alignment(name, x, _itemsize(x))


def _positive_int(name, value):
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a positive int, got bool {value}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected a positive int, got {_type_name(value)}") from None
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def _check_not_supported(is_fp8_kvcache, sparse_name, sparse_value):
    if is_fp8_kvcache:
        raise ValueError(
            f"is_fp8_kvcache: fp8 KV cache is not supported in this version, got "
            f"{is_fp8_kvcache!r}; pass a bfloat16 or float16 k_cache with is_fp8_kvcache=False")
    if sparse_value is not None:
        raise ValueError(
            f"{sparse_name}: sparse attention is not supported in this version, got "
            f"{_type_name(sparse_value)}; pass {sparse_name}=None")


# --------------------------------------------------------------------------------------------
# Public checks.


def resolve_validate(validate):
    """The effective ``validate`` flag: the argument, or ``MLA_CUPY_VALIDATE`` when it is None."""
    if validate is None:
        return CONFIG.validate
    if isinstance(validate, (bool, np.bool_)):
        return bool(validate)
    raise TypeError(f"validate: expected True, False or None, got {validate!r}")


def check_warmup_args(head_dims, dtypes, num_q_tokens_per_head_k, default_rows):
    """Check ``warmup``'s arguments; return them resolved: (head-dim pairs, dtype names, row
    counts), defaults filled in (every supported pair and dtype, ``default_rows``)."""
    pairs = HEAD_DIMS if head_dims is None else tuple(tuple(p) for p in head_dims)
    for pair in pairs:
        if pair not in HEAD_DIMS:
            raise ValueError(f"head_dims: expected pairs among {HEAD_DIMS}, got {pair}")
    names = DTYPES if dtypes is None else tuple(dtypes)
    for name in names:
        if name not in DTYPES:
            raise ValueError(f"dtypes: expected names among {DTYPES}, got {name!r}")
    if num_q_tokens_per_head_k is None:
        rows = tuple(default_rows)
    elif isinstance(num_q_tokens_per_head_k, (int, np.integer)):
        rows = (int(num_q_tokens_per_head_k),)
    else:
        rows = tuple(int(m) for m in num_q_tokens_per_head_k)
    for m in rows:
        if m < 1:
            raise ValueError(f"num_q_tokens_per_head_k: expected positive integers, got {m}")
    return pairs, names, rows


def check_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
                        is_fp8_kvcache=False, topk=None):
    """Check the arguments of ``get_mla_metadata``; raise on the first problem found."""
    _check_not_supported(is_fp8_kvcache, "topk", topk)
    _check_index_vector("cache_seqlens", cache_seqlens, None, "batch")
    _positive_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k)
    h_kv = _positive_int("num_heads_k", num_heads_k)
    if num_heads_q is not None:
        h_q = _positive_int("num_heads_q", num_heads_q)
        if h_q % h_kv:
            raise ValueError(
                f"num_heads_q: expected a multiple of num_heads_k ({h_kv}), got {h_q}")


def check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v,
                      tile_scheduler_metadata, num_splits, softmax_scale, causal,
                      is_fp8_kvcache, indices, out, lse):
    """Check the arguments of ``flash_mla_with_kvcache`` and return the problem they describe.

    Nothing here reads array contents; see :func:`check_device_data` for that.
    """
    _check_not_supported(is_fp8_kvcache, "indices", indices)

    # q: [batch, s_q, h_q, head_dim]
    _check_array("q", q)
    _check_ndim("q", q, 4, "[batch, s_q, h_q, head_dim]")
    dtype = _dtype_name(q.dtype)
    if dtype not in DTYPES:
        raise TypeError(f"q: expected dtype {' or '.join(DTYPES)}, got {dtype}")
    batch, s_q, h_q, head_dim = (int(n) for n in q.shape)
    if min(batch, s_q, h_q) < 1:
        raise ValueError(
            f"q: expected batch, s_q and h_q >= 1 [batch, s_q, h_q, head_dim], got shape "
            f"{tuple(q.shape)}")
    if head_dim not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"q: expected head_dim (last dimension) one of {_SUPPORTED_HEAD_DIMS}, got {head_dim}")

    # head_dim_v must pair with head_dim.
    if isinstance(head_dim_v, (bool, np.bool_)):
        raise TypeError(f"head_dim_v: expected an int, got bool {head_dim_v}")
    try:
        head_dim_v = operator.index(head_dim_v)
    except TypeError:
        raise TypeError(f"head_dim_v: expected an int, got {_type_name(head_dim_v)}") from None
    if (head_dim, head_dim_v) not in HEAD_DIMS:
        allowed = tuple(dv for d, dv in HEAD_DIMS if d == head_dim)
        raise ValueError(
            f"head_dim_v: expected {' or '.join(map(str, allowed))} for head_dim {head_dim}, "
            f"got {head_dim_v}")

    # k_cache: [num_blocks, page_block_size, h_kv, head_dim]; V is its first head_dim_v columns.
    _check_array("k_cache", k_cache)
    _check_ndim("k_cache", k_cache, 4, "[num_blocks, page_block_size, h_kv, head_dim]")
    _check_dtype("k_cache", k_cache, dtype, "same as q")
    num_blocks, page, h_kv, k_dim = (int(n) for n in k_cache.shape)
    if k_dim != head_dim:
        raise ValueError(
            f"k_cache: expected head_dim (last dimension) {head_dim} (same as q), got {k_dim}")
    if num_blocks < 1:
        raise ValueError(
            f"k_cache: expected num_blocks (first dimension) >= 1, got shape "
            f"{tuple(k_cache.shape)}")
    if not MIN_PAGE_BLOCK_SIZE <= page <= MAX_PAGE_BLOCK_SIZE:
        raise ValueError(
            f"k_cache: expected page_block_size (second dimension) in "
            f"[{MIN_PAGE_BLOCK_SIZE}, {MAX_PAGE_BLOCK_SIZE}], got {page}")
    if h_kv < 1:
        raise ValueError(f"k_cache: expected h_kv (third dimension) >= 1, got {h_kv}")
    if h_q % h_kv:
        raise ValueError(
            f"q: expected h_q a multiple of k_cache's h_kv ({h_kv}), got h_q {h_q}")

    _check_vector_layout("q", q)
    _check_vector_layout("k_cache", k_cache)

    # block_table: [batch, max_blocks_per_seq], rows may be strided.
    _check_array("block_table", block_table)
    _check_dtype("block_table", block_table, INDEX_DTYPE)
    _check_ndim("block_table", block_table, 2, "[batch, max_blocks_per_seq]")
    if int(block_table.shape[0]) != batch:
        raise ValueError(
            f"block_table: expected {batch} rows (batch of q) [batch, max_blocks_per_seq], "
            f"got shape {tuple(block_table.shape)}")
    max_blocks = int(block_table.shape[1])
    _check_strides_nonnegative("block_table", block_table)
    _check_last_dim_contiguous("block_table", block_table)
    _check_element_strides("block_table", block_table)
    _check_pointer_alignment("block_table", block_table, _itemsize(block_table))

    _check_index_vector("cache_seqlens", cache_seqlens, batch, "batch")

    # Scheduler output of get_mla_metadata.
    name = "tile_scheduler_metadata"
    _check_array(name, tile_scheduler_metadata)
    _check_dtype(name, tile_scheduler_metadata, INDEX_DTYPE)
    _check_ndim(name, tile_scheduler_metadata, 2, f"[num_sm_parts, {SCHED_METADATA_SIZE}]")
    num_sm_parts, fields = (int(n) for n in tile_scheduler_metadata.shape)
    if fields != SCHED_METADATA_SIZE or num_sm_parts < 1:
        raise ValueError(
            f"{name}: expected shape (num_sm_parts >= 1, {SCHED_METADATA_SIZE}) as returned by "
            f"get_mla_metadata, got {tuple(tile_scheduler_metadata.shape)}")
    _check_c_contiguous(name, tile_scheduler_metadata)
    _check_pointer_alignment(name, tile_scheduler_metadata, _itemsize(tile_scheduler_metadata))

    _check_array("num_splits", num_splits)
    _check_dtype("num_splits", num_splits, INDEX_DTYPE)
    _check_ndim("num_splits", num_splits, 1, "[batch + 1]")
    if int(num_splits.shape[0]) != batch + 1:
        raise ValueError(
            f"num_splits: expected length {batch + 1} (batch + 1), got {num_splits.shape[0]}; "
            f"tile_scheduler_metadata and num_splits look like metadata from a different batch, "
            f"call get_mla_metadata with this batch's cache_seqlens")
    _check_c_contiguous("num_splits", num_splits)
    _check_pointer_alignment("num_splits", num_splits, _itemsize(num_splits))

    # Scalars.
    if softmax_scale is None:
        scale = head_dim ** -0.5
    else:
        if isinstance(softmax_scale, (bool, np.bool_)) or not isinstance(
                softmax_scale, numbers.Real):
            raise TypeError(
                f"softmax_scale: expected a float or None, got {_type_name(softmax_scale)}")
        try:
            scale = float(softmax_scale)
        except OverflowError:
            raise ValueError(
                f"softmax_scale: expected a finite positive float, got {_type_name(softmax_scale)} "
                "too large for a float") from None
        if not math.isfinite(scale) or scale <= 0.0:
            raise ValueError(
                f"softmax_scale: expected a finite positive float, got {softmax_scale!r}")
    if isinstance(causal, (bool, np.bool_)):
        causal = bool(causal)
    elif isinstance(causal, numbers.Integral) and causal in (0, 1):
        causal = bool(causal)
    else:
        raise TypeError(f"causal: expected a bool, got {causal!r}")

    # Optional output buffers.
    if out is not None:
        _check_array("out", out)
        _check_dtype("out", out, dtype, "same as q")
        _check_shape("out", out, (batch, s_q, h_q, head_dim_v),
                     "[batch, s_q, h_q, head_dim_v]")
        _check_c_contiguous("out", out)
        _check_pointer_alignment("out", out, _VECTOR_ALIGN)
    if lse is not None:
        _check_array("lse", lse)
        _check_dtype("lse", lse, LSE_DTYPE)
        _check_shape("lse", lse, (batch, h_q, s_q), "[batch, h_q, s_q]")
        _check_c_contiguous("lse", lse)
        _check_pointer_alignment("lse", lse, np.dtype(LSE_DTYPE).itemsize)

    return DecodeProblem(
        batch=batch, s_q=s_q, h_q=h_q, h_kv=h_kv, head_dim=head_dim, head_dim_v=head_dim_v,
        page_block_size=page, num_blocks=num_blocks, max_blocks_per_seq=max_blocks,
        num_sm_parts=num_sm_parts, dtype=dtype, softmax_scale=scale, causal=causal)


def _to_host(x):
    get = getattr(x, "get", None)
    return np.asarray(get() if callable(get) else x)


def check_seqlens_data(cache_seqlens):
    """Check the contents of ``cache_seqlens`` for ``get_mla_metadata`` (a host sync; opt-in):
    every length >= 0 and small enough that the scheduler's block counts cannot overflow."""
    seqlens = _to_host(cache_seqlens).astype(np.int64)
    bad = np.flatnonzero((seqlens < 0) | (seqlens > _MAX_SEQLEN))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"cache_seqlens[{i}]: expected a length >= 0 and <= {_MAX_SEQLEN}, got {seqlens[i]}")
    return seqlens


# Longest sequence the int32 scheduler arithmetic is safe for (2^31 minus a page of headroom).
_MAX_SEQLEN = 2**31 - 1 - 256


def check_metadata_data(tile_scheduler_metadata, num_splits, seqlens):
    """Check that the schedule is the one ``get_mla_metadata`` makes for these seqlens (host
    sync; opt-in): a schedule from other seqlens of the same batch size would split the work
    wrongly, and one from a larger batch would read and write out of bounds."""
    from .scheduler import schedule

    sched = _to_host(tile_scheduler_metadata)
    splits = _to_host(num_splits)
    want_sched, want_splits = schedule(seqlens, sched.shape[0])
    if not np.array_equal(splits, want_splits):
        i = int(np.flatnonzero(splits != want_splits)[0])
        raise ValueError(
            f"num_splits[{i}]: expected {want_splits[i]} (the schedule of these cache_seqlens), got "
            f"{splits[i]}; call get_mla_metadata again when cache_seqlens change")
    if not np.array_equal(sched, want_sched):
        i = int(np.flatnonzero((sched != want_sched).any(axis=1))[0])
        raise ValueError(
            f"tile_scheduler_metadata[{i}]: expected {want_sched[i].tolist()} (the schedule of these "
            f"cache_seqlens), got {sched[i].tolist()}; call get_mla_metadata again when cache_seqlens "
            "change")


def check_device_data(block_table, cache_seqlens, problem, tile_scheduler_metadata=None, num_splits=None):
    """Check the contents of ``cache_seqlens``, ``block_table`` and (when given) the schedule
    (a host sync; opt-in).

    Every seqlen must be >= 0 and fit in its block-table row, and every block id a sequence
    uses (the first ``ceil(seqlen / page_block_size)`` entries of its row) must index k_cache.
    Entries past a sequence's last page are never read and are not checked. The schedule must
    be the one ``get_mla_metadata`` makes for these seqlens.
    """
    seqlens = check_seqlens_data(cache_seqlens)
    page = problem.page_block_size
    capacity = problem.max_blocks_per_seq * page

    too_long = np.flatnonzero(seqlens > capacity)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(
            f"cache_seqlens[{i}]: expected at most {capacity} tokens (block_table has "
            f"{problem.max_blocks_per_seq} columns of {page} tokens), got {seqlens[i]}")

    table = _to_host(block_table).astype(np.int64)
    used = -(-seqlens // page)
    in_use = np.arange(problem.max_blocks_per_seq)[None, :] < used[:, None]
    bad = in_use & ((table < 0) | (table >= problem.num_blocks))
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"block_table[{i}, {j}]: expected a block id in [0, {problem.num_blocks}) "
            f"(k_cache has {problem.num_blocks} blocks; batch {i} uses {used[i]} blocks for "
            f"{seqlens[i]} tokens), got {table[i, j]}")
    if tile_scheduler_metadata is not None:
        check_metadata_data(tile_scheduler_metadata, num_splits, seqlens)
