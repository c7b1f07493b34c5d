"""Property-based tests of the argument checks (hypothesis), on the CPU.

Three properties of ``_validate.check_decode_args`` and ``_validate.check_metadata_args``, over
random ranks, shapes, dtypes, strides and pointers of stand-in arrays (no memory behind them):

* a valid problem is accepted, and the problem returned agrees with the inputs;
* one mutation of a valid problem is refused with TypeError or ValueError whose message starts
  with the name of the mutated argument (``"k_cache: ..."``);
* junk in place of any array argument raises nothing but a named TypeError or ValueError.

A fourth property drives the public ``flash_mla_with_kvcache`` and ``get_mla_metadata`` with
host arrays and foreign objects: a named TypeError, raised before anything touches a GPU.
"""

import contextlib
import math
import types
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mla_cupy._validate import DecodeProblem, check_decode_args, check_metadata_args
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

# Deterministic (CI reruns draw the same examples) and quick; no example database in the checkout.
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

ARRAY_ARGS = ("q", "k_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata",
              "num_splits", "out", "lse")
ALL_ARGS = ARRAY_ARGS + ("head_dim_v", "softmax_scale", "causal", "is_fp8_kvcache", "indices")
INT32 = np.dtype(np.int32)
F32 = np.dtype(np.float32)
OTHER_DTYPES = [np.dtype(t) for t in (np.float32, np.float64, np.int8, np.uint8, np.int16,
                                      np.int32, np.int64, np.uint32, np.bool_, np.complex64)]
ALL_DTYPES = OTHER_DTYPES + list(NP_DTYPES.values())
SUPPORTED_D = {d for d, _ in HEAD_DIMS}
VEC = 16  # byte alignment of q, k_cache and out (pointer and strides)


# The stand-ins of tests/test_validate.py (test modules do not import each other: CI collects
# with --import-mode=importlib).


def aligned_empty(shape, dtype):
    """A NumPy array whose data pointer is ALIGN-aligned."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class FakeArray:
    """Just the attributes the validators read (CuPy-style ``data.ptr``): no memory behind it."""

    def __init__(self, shape, dtype, strides=None, ptr=ALIGN):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.strides = c_strides(self.shape, self.dtype.itemsize) if strides is None else tuple(
            strides)
        self.data = types.SimpleNamespace(ptr=ptr)

    def __repr__(self):
        return (f"FakeArray({self.shape}, {self.dtype}, strides={self.strides}, "
                f"ptr={self.data.ptr:#x})")


def assert_named(excinfo, names):
    """The error is a TypeError or ValueError whose message starts with one of ``names``."""
    assert excinfo.type in (TypeError, ValueError), excinfo.type
    message = str(excinfo.value)
    prefix = message.split(":", 1)[0]
    assert prefix in names, f"expected a message naming one of {sorted(names)}, got {message!r}"


def c_strides(shape, itemsize):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


# --------------------------------------------------------------------------------------------
# Valid problems: sizes, layouts and pointers.


@st.composite
def problem_sizes(draw, small=False):
    d, dv = draw(st.sampled_from(HEAD_DIMS))
    h_kv = draw(st.integers(1, 2 if small else 8))
    ngroups = draw(st.integers(1, 4 if small else 128))
    return dict(
        batch=draw(st.integers(1, 3 if small else 64)),
        s_q=draw(st.integers(1, 2 if small else 8)),
        h_q=h_kv * ngroups, h_kv=h_kv, d=d, dv=dv,
        page=draw(st.integers(MIN_PAGE_BLOCK_SIZE, 16 if small else MAX_PAGE_BLOCK_SIZE)),
        dtype=draw(st.sampled_from(DTYPES)),
        num_blocks=draw(st.integers(1, 4 if small else 1 << 20)),
        max_blocks=draw(st.integers(1, 4 if small else 1 << 14)),
        parts=draw(st.integers(1, 264)),
    )


@st.composite
def any_stride(draw):
    return draw(st.integers(-(1 << 40), 1 << 40))


@st.composite
def layout(draw, shape, itemsize, kind):
    """Strides (bytes) the checks must accept for ``kind``:

    * ``"vector"`` (q, k_cache): last dimension contiguous, every other stride a non-negative
      multiple of 16 bytes;
    * ``"rows"`` (block_table): last dimension contiguous, other strides non-negative multiples
      of the item size;
    * ``"dense"``: C-contiguous.

    The stride of a dimension of length one is never read, so it is anything at all.
    """
    strides = list(c_strides(shape, itemsize))
    if kind != "dense":
        unit = VEC if kind == "vector" else itemsize
        mode = draw(st.sampled_from(["contiguous", "padded", "arbitrary"]))
        extent = shape[-1] * itemsize
        for i in range(len(shape) - 2, -1, -1):
            if mode == "padded":
                extent = -(-extent // unit) * unit + unit * draw(st.integers(0, 8))
                strides[i] = extent
                extent *= shape[i]
            elif mode == "arbitrary":
                strides[i] = unit * draw(st.integers(0, 1 << 24))
    for i, n in enumerate(shape):
        if n == 1 and draw(st.booleans()):
            strides[i] = draw(any_stride())
    return tuple(strides)


@st.composite
def pointer(draw, align):
    return align * draw(st.integers(1, 1 << 36))


@st.composite
def fake(draw, shape, dtype, kind, align):
    dtype = np.dtype(dtype)
    return FakeArray(shape, dtype, draw(layout(shape, dtype.itemsize, kind)), draw(pointer(align)))


@st.composite
def valid_decode(draw):
    """``(keyword arguments of check_decode_args, sizes)`` of a valid problem, stand-in arrays."""
    p = draw(problem_sizes())
    t = NP_DTYPES[p["dtype"]]
    b, s_q, h_q = p["batch"], p["s_q"], p["h_q"]
    args = dict(
        q=draw(fake((b, s_q, h_q, p["d"]), t, "vector", VEC)),
        k_cache=draw(fake((p["num_blocks"], p["page"], p["h_kv"], p["d"]), t, "vector", VEC)),
        block_table=draw(fake((b, p["max_blocks"]), INT32, "rows", 4)),
        cache_seqlens=draw(fake((b,), INT32, "dense", 4)),
        head_dim_v=draw(st.sampled_from([int, np.int32, np.int64]))(p["dv"]),
        tile_scheduler_metadata=draw(fake((p["parts"], SCHED_METADATA_SIZE), INT32, "dense", 4)),
        num_splits=draw(fake((b + 1,), INT32, "dense", 4)),
        softmax_scale=draw(st.one_of(
            st.none(),
            st.floats(1e-30, 1e30, allow_nan=False, allow_infinity=False),
            st.floats(0.25, 1024.0, width=32).map(np.float32),
            st.integers(1, 1000))),
        causal=draw(st.sampled_from([True, False, np.bool_(True), np.bool_(False), 0, 1])),
        is_fp8_kvcache=draw(st.sampled_from([False, None, 0])),
        indices=None,
        out=None,
        lse=None,
    )
    if draw(st.booleans()):
        args["out"] = draw(fake((b, s_q, h_q, p["dv"]), t, "dense", VEC))
    if draw(st.booleans()):
        args["lse"] = draw(fake((b, h_q, s_q), F32, "dense", 4))
    return args, p


@st.composite
def valid_decode_numpy(draw):
    """A small valid problem of real NumPy arrays (pointers read through ``.ctypes``)."""
    p = draw(problem_sizes(small=True))
    t = NP_DTYPES[p["dtype"]]
    b, s_q, h_q, d = p["batch"], p["s_q"], p["h_q"], p["d"]
    q_pad, k_pad, bt_pad = (draw(st.integers(0, 2)) for _ in range(3))
    args = dict(
        q=aligned_empty((b, s_q, h_q, d + 8 * q_pad), t)[..., :d],
        k_cache=aligned_empty((p["num_blocks"], p["page"], p["h_kv"], d + 8 * k_pad), t)[..., :d],
        block_table=np.zeros((b, p["max_blocks"] + bt_pad), np.int32)[:, :p["max_blocks"]],
        cache_seqlens=np.zeros(b, np.int32),
        head_dim_v=p["dv"],
        tile_scheduler_metadata=np.zeros((p["parts"], SCHED_METADATA_SIZE), np.int32),
        num_splits=np.zeros(b + 1, np.int32),
        softmax_scale=None, causal=True, is_fp8_kvcache=False, indices=None,
        out=aligned_empty((b, s_q, h_q, p["dv"]), t) if draw(st.booleans()) else None,
        lse=np.zeros((b, h_q, s_q), np.float32) if draw(st.booleans()) else None,
    )
    return args, p


def expected_problem(args, p):
    scale = args["softmax_scale"]
    return DecodeProblem(
        batch=p["batch"], s_q=p["s_q"], h_q=p["h_q"], h_kv=p["h_kv"], head_dim=p["d"],
        head_dim_v=p["dv"], page_block_size=p["page"], num_blocks=p["num_blocks"],
        max_blocks_per_seq=p["max_blocks"], num_sm_parts=p["parts"], dtype=p["dtype"],
        softmax_scale=p["d"] ** -0.5 if scale is None else float(scale),
        causal=bool(args["causal"]))


@PROPERTY
@given(st.one_of(valid_decode(), valid_decode_numpy()))
def test_valid_problem_is_accepted_and_described(case):
    args, p = case
    problem = check_decode_args(**args)
    assert problem == expected_problem(args, p)
    assert type(problem.head_dim_v) is int and type(problem.softmax_scale) is float
    assert type(problem.causal) is bool
    assert problem.ngroups == p["h_q"] // p["h_kv"] and problem.ngroups * p["h_kv"] == p["h_q"]
    assert problem.m == p["s_q"] * problem.ngroups
    assert math.isfinite(problem.softmax_scale) and problem.softmax_scale > 0


@st.composite
def valid_metadata(draw):
    h_kv = draw(st.integers(1, 8))
    return dict(
        cache_seqlens=draw(st.one_of(
            fake((draw(st.integers(1, 1 << 16)),), INT32, "dense", 4),
            st.integers(1, 8).map(lambda n: np.zeros(n, np.int32)))),
        num_q_tokens_per_head_k=draw(st.one_of(st.integers(1, 1 << 20),
                                               st.integers(1, 1 << 20).map(np.int64))),
        num_heads_k=h_kv,
        num_heads_q=draw(st.one_of(st.none(), st.integers(1, 128).map(lambda g: g * h_kv))),
        is_fp8_kvcache=draw(st.sampled_from([False, None, 0])),
        topk=None,
    )


@PROPERTY
@given(valid_metadata())
def test_valid_metadata_args_are_accepted(args):
    assert check_metadata_args(**args) is None


# --------------------------------------------------------------------------------------------
# One mutation of a valid problem: refused, naming the argument.


def replace(x, shape=None, dtype=None, strides=None, ptr=None):
    """A stand-in like ``x`` (a FakeArray) with some attributes changed; strides follow a new
    shape or dtype (C-contiguous) unless given."""
    new_shape = x.shape if shape is None else tuple(shape)
    new_dtype = x.dtype if dtype is None else np.dtype(dtype)
    if strides is None:
        if new_shape == x.shape and new_dtype.itemsize == x.dtype.itemsize:
            strides = x.strides
        else:
            strides = c_strides(new_shape, new_dtype.itemsize)
    return FakeArray(new_shape, new_dtype, strides, x.data.ptr if ptr is None else ptr)


def _long_dims(x, skip_last=False):
    dims = range(len(x.shape) - (1 if skip_last else 0))
    return [i for i in dims if x.shape[i] > 1]


def m_rank(draw, args, p, name):
    x = args[name]
    shape = list(x.shape)
    if len(shape) > 1 and draw(st.booleans()):
        del shape[draw(st.integers(0, len(shape) - 1))]
    else:
        shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(1, 4)))
    args[name] = replace(x, shape=shape)
    return {name}


def m_dtype(draw, args, p, name):
    x = args[name]
    if name == "q":  # to a dtype no kernel takes; bfloat16 <-> float16 is the k_cache case
        pool = OTHER_DTYPES
    else:
        pool = [t for t in ALL_DTYPES if t != x.dtype]
    args[name] = replace(x, dtype=draw(st.sampled_from(pool)))
    return {name}


def m_dimension(draw, args, p, name):
    """One dimension of an array that must match the others (or a supported value) changed."""
    x = args[name]
    shape = list(x.shape)
    if name == "q":
        i = draw(st.sampled_from([0, 3]))  # batch (block_table disagrees) or head_dim
    elif name == "k_cache":
        i = draw(st.sampled_from([0, 1, 2, 3]))
    elif name == "tile_scheduler_metadata":
        i = draw(st.sampled_from([0, 1]))
    elif name == "block_table":
        i = 0  # rows; the number of columns is free
    else:
        i = draw(st.integers(0, len(shape) - 1))
    value = shape[i]
    if (name, i) == ("q", 0):
        shape[i] = draw(st.integers(1, 128).filter(lambda n: n != value))
        args[name] = replace(x, shape=shape)
        return {"q", "block_table"}
    if (name, i) == ("q", 3):  # no supported head_dim (another would be head_dim_v's error)
        shape[i] = draw(st.integers(0, 1024).filter(lambda n: n not in SUPPORTED_D))
    elif (name, i) == ("k_cache", 3):
        shape[i] = draw(st.integers(0, 1024).filter(lambda n: n != value))
    elif (name, i) == ("k_cache", 0):
        shape[i] = 0
    elif (name, i) == ("k_cache", 1):
        shape[i] = draw(st.sampled_from([0, MAX_PAGE_BLOCK_SIZE + 1, 1 << 20]))
    elif (name, i) == ("k_cache", 2):  # h_kv 0, or h_q no longer a multiple of it
        options = [0] + [n for n in range(2, 2 * p["h_q"] + 2) if p["h_q"] % n]
        shape[i] = draw(st.sampled_from(options))
        args[name] = replace(x, shape=shape)
        return {"k_cache", "q"}
    elif (name, i) == ("tile_scheduler_metadata", 0):
        shape[i] = 0
    else:
        shape[i] = draw(st.integers(0, 1 << 12).filter(lambda n: n != value))
    args[name] = replace(x, shape=shape)
    return {name}


def m_zero_q_dim(draw, args, p, name):
    x = args["q"]
    shape = list(x.shape)
    shape[draw(st.integers(0, 2))] = 0
    args["q"] = replace(x, shape=shape)
    return {"q"}


def m_head_dim_v(draw, args, p, name):
    args["head_dim_v"] = draw(st.integers(-4, 2048).filter(lambda n: n != p["dv"]))
    return {"head_dim_v"}


def m_stride_misaligned(draw, args, p, name):
    """An outer stride that is no multiple of 16 bytes (q, k_cache) or of the item size."""
    x = args[name]
    dims = _long_dims(x, skip_last=True)
    if not dims:
        return None
    i = draw(st.sampled_from(dims))
    unit = VEC if name in ("q", "k_cache") else x.dtype.itemsize
    strides = list(x.strides)
    strides[i] = draw(st.integers(1, 1 << 24).filter(lambda s: s % unit))
    args[name] = replace(x, strides=strides)
    return {name}


def m_last_dim_strided(draw, args, p, name):
    x = args[name]
    if x.shape[-1] < 2:
        return None
    strides = list(x.strides)
    itemsize = x.dtype.itemsize
    strides[-1] = draw(st.integers(-(1 << 12), 1 << 12).filter(lambda s: s != itemsize))
    args[name] = replace(x, strides=strides)
    return {name}


def m_negative_stride(draw, args, p, name):
    x = args[name]
    dims = _long_dims(x)
    if not dims:
        return None
    i = draw(st.sampled_from(dims))
    strides = list(x.strides)
    strides[i] = -abs(strides[i]) or -VEC
    args[name] = replace(x, strides=strides)
    return {name}


def m_not_dense(draw, args, p, name):
    """A C-contiguous argument (cache_seqlens, the schedule, out, lse) given other strides."""
    x = args[name]
    dims = _long_dims(x)
    if not dims:
        return None
    i = draw(st.sampled_from(dims))
    strides = list(x.strides)
    strides[i] = draw(st.integers(-(1 << 20), 1 << 20).filter(lambda s: s != x.strides[i]))
    args[name] = replace(x, strides=strides)
    return {name}


def m_pointer(draw, args, p, name):
    x = args[name]
    align = VEC if name in ("q", "k_cache", "out") else x.dtype.itemsize
    args[name] = replace(x, ptr=draw(st.integers(1, 1 << 40).filter(lambda a: a % align)))
    return {name}


def m_scalar(draw, args, p, name):
    bad = {
        "head_dim_v": st.one_of(st.sampled_from([None, True, np.bool_(False), "512", 512.0,
                                                 b"512", [512], (512,)]),
                                st.floats()),
        "softmax_scale": st.one_of(
            st.sampled_from([True, np.bool_(True), "0.1", b"0.1", [0.1], 0, -1, 10 ** 400,
                             -10 ** 400, complex(0.1, 0), np.float64("nan"), np.float32("inf")]),
            st.floats(max_value=0.0), st.just(float("nan"))),
        "causal": st.sampled_from([None, "yes", "", 2, -1, 0.0, 1.0, np.int64(2), [True],
                                   np.array([True, False])]),
        "is_fp8_kvcache": st.sampled_from([True, 1, np.bool_(True), "fp8"]),
        "indices": st.sampled_from([np.zeros((2, 1, 64), np.int32), 0, [], "all"]),
    }
    args[name] = draw(bad[name])
    return {name}


MUTATIONS = (
    [(m_rank, n) for n in ARRAY_ARGS]
    + [(m_dtype, n) for n in ARRAY_ARGS]
    + [(m_dimension, n) for n in ("q", "k_cache", "block_table", "cache_seqlens",
                                  "tile_scheduler_metadata", "num_splits", "out", "lse")]
    + [(m_zero_q_dim, "q"), (m_head_dim_v, "head_dim_v")]
    + [(m_stride_misaligned, n) for n in ("q", "k_cache", "block_table")]
    + [(m_last_dim_strided, n) for n in ("q", "k_cache", "block_table")]
    + [(m_negative_stride, n) for n in ("q", "k_cache", "block_table")]
    + [(m_not_dense, n) for n in ("cache_seqlens", "tile_scheduler_metadata", "num_splits",
                                  "out", "lse")]
    + [(m_pointer, n) for n in ARRAY_ARGS]
    + [(m_scalar, n) for n in ("head_dim_v", "softmax_scale", "causal", "is_fp8_kvcache",
                               "indices")]
)


def _with_outputs(args, p):
    """Both optional output buffers present (valid, C-contiguous), so they can be mutated."""
    b, s_q, h_q = p["batch"], p["s_q"], p["h_q"]
    if args["out"] is None:
        args["out"] = FakeArray((b, s_q, h_q, p["dv"]), NP_DTYPES[p["dtype"]], ptr=ALIGN)
    if args["lse"] is None:
        args["lse"] = FakeArray((b, h_q, s_q), F32, ptr=ALIGN)


@pytest.mark.parametrize("mutate, name", MUTATIONS,
                         ids=[f"{m.__name__[2:]}-{n}" for m, n in MUTATIONS])
@settings(PROPERTY, max_examples=10)
@given(case=valid_decode(), data=st.data())
def test_one_mutation_is_refused_naming_the_argument(mutate, name, case, data):
    args, p = case
    if name in ("out", "lse"):
        _with_outputs(args, p)
    names = mutate(data.draw, args, p, name)
    assume(names is not None)
    with pytest.raises((TypeError, ValueError)) as info:
        check_decode_args(**args)
    assert_named(info, names)


def test_mutations_cover_every_argument():
    assert {name for _, name in MUTATIONS} == set(ALL_ARGS)


@st.composite
def mutated_metadata(draw):
    args = draw(valid_metadata())
    name = draw(st.sampled_from(["cache_seqlens", "num_q_tokens_per_head_k", "num_heads_k",
                                 "num_heads_q", "is_fp8_kvcache", "topk"]))
    x = args["cache_seqlens"]
    if name == "cache_seqlens":
        n = x.shape[0]
        args[name] = draw(st.one_of(
            st.builds(FakeArray, st.just((n,)), st.sampled_from([t for t in ALL_DTYPES
                                                                if t != INT32])),
            st.builds(FakeArray, st.sampled_from([(0,), (n, 1), (1, n), ()]), st.just(INT32)),
            st.builds(FakeArray, st.just((n + 1,)), st.just(INT32),
                      st.integers(-64, 64).filter(lambda s: s != 4).map(lambda s: (s,))),
            st.builds(FakeArray, st.just((n,)), st.just(INT32),
                      ptr=st.integers(1, 1 << 40).filter(lambda a: a % 4)),
        ))
    elif name == "num_heads_q":
        h_kv = args["num_heads_k"]
        args[name] = draw(st.one_of(
            st.integers(-8, 0), st.integers(1, 1024).filter(lambda h: h % h_kv),
            st.sampled_from([True, 2.0, "16", [16]])))
    elif name in ("num_q_tokens_per_head_k", "num_heads_k"):
        args[name] = draw(st.one_of(st.integers(-(1 << 40), 0),
                                    st.sampled_from([None, True, np.bool_(True), 1.0, "1",
                                                     [1], np.float32(1)])))
    elif name == "is_fp8_kvcache":
        args[name] = draw(st.sampled_from([True, 1, np.bool_(True), "fp8"]))
    else:
        args[name] = draw(st.sampled_from([64, 0, np.int32(64), "64"]))
    return args, name


@PROPERTY
@given(mutated_metadata())
def test_one_metadata_mutation_is_refused_naming_the_argument(case):
    args, name = case
    with pytest.raises((TypeError, ValueError)) as info:
        check_metadata_args(**args)
    assert_named(info, {name})


# --------------------------------------------------------------------------------------------
# Junk in place of an array: only named TypeError / ValueError.


class OddArray:
    """Array-looking attributes set from keyword arguments (any of them junk)."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)

    def __repr__(self):
        return f"OddArray({self.__dict__!r})"


ODD_VALUES = st.sampled_from([None, 0, -1, 2.5, "ab", b"", (), [], {}, (1.5,), ("2",), (None,),
                              (-1,), (2, -3), object(), float("nan")])


@st.composite
def odd_array(draw):
    """Shape, dtype, strides and pointer attributes, each valid-looking or junk."""
    ndim = draw(st.integers(0, 5))
    shape = draw(st.one_of(st.tuples(*[st.integers(-2, 600)] * ndim), ODD_VALUES,
                           st.lists(st.integers(0, 8), max_size=5)))
    n = len(shape) if isinstance(shape, (tuple, list)) else ndim
    strides = draw(st.one_of(st.tuples(*[st.integers(-64, 1 << 12)] * n), ODD_VALUES,
                             st.tuples(*[st.integers(0, 64)] * draw(st.integers(0, 5)))))
    dtype = draw(st.one_of(st.sampled_from(ALL_DTYPES), st.sampled_from(DTYPES + ("int32",)),
                           ODD_VALUES, st.builds(types.SimpleNamespace,
                                                 name=st.sampled_from(DTYPES + ("int32", None)))))
    attrs = dict(shape=shape, dtype=dtype, strides=strides)
    for attr in draw(st.sets(st.sampled_from(["shape", "dtype", "strides"]), max_size=1)):
        del attrs[attr]
    where = draw(st.sampled_from(["none", "data", "ctypes", "cai", "ai"]))
    ptr = draw(st.one_of(st.integers(-16, 1 << 40), ODD_VALUES))
    if where == "data":
        attrs["data"] = draw(st.sampled_from([types.SimpleNamespace(ptr=ptr),
                                              types.SimpleNamespace(), ptr, b"\0" * 4]))
    elif where == "ctypes":
        attrs["ctypes"] = draw(st.sampled_from([types.SimpleNamespace(data=ptr),
                                                types.SimpleNamespace(), ptr]))
    elif where in ("cai", "ai"):
        key = "__cuda_array_interface__" if where == "cai" else "__array_interface__"
        attrs[key] = draw(st.sampled_from([{"data": (ptr, False)}, {"data": ptr}, {}, ptr,
                                           {"data": ()}]))
    return OddArray(**attrs)


@st.composite
def numpy_array(draw):
    shape = draw(st.lists(st.integers(0, 4), max_size=5))
    x = np.zeros(shape, draw(st.sampled_from(ALL_DTYPES)))
    if x.ndim and draw(st.booleans()):
        x = x[..., ::-1] if draw(st.booleans()) else x.swapaxes(0, -1)
    return x


class DLPackJunk:
    """An object with DLPack methods and nothing else (what a foreign framework may pass)."""

    def __init__(self, device):
        self.device = device

    def __dlpack__(self, **kwargs):
        raise AssertionError("a CPU test must not reach the conversion")

    def __dlpack_device__(self):
        if isinstance(self.device, Exception):
            raise self.device
        return self.device


def junk():
    return st.one_of(
        st.none(), st.integers(), st.floats(), st.text(max_size=4), st.binary(max_size=4),
        st.lists(st.integers(), max_size=3), st.tuples(st.integers(0, 4), st.integers(0, 4)),
        numpy_array(), odd_array(),
        st.builds(DLPackJunk, st.sampled_from([(1, 0), (2, 0), None, (2,), "cuda", 5,
                                               RuntimeError("no device")])),
        st.builds(FakeArray, st.lists(st.integers(0, 600), max_size=5).map(tuple),
                  st.sampled_from(ALL_DTYPES)),
    )


@pytest.mark.parametrize("name", ARRAY_ARGS)
@settings(PROPERTY, max_examples=40)
@given(case=valid_decode(), data=st.data())
def test_junk_array_argument_raises_only_named_errors(name, case, data):
    args, p = case
    args[name] = data.draw(junk(), label=name)
    try:
        problem = check_decode_args(**args)
    except (TypeError, ValueError) as exc:
        prefix = str(exc).split(":", 1)[0]
        assert prefix in ALL_ARGS, f"error names no argument: {exc!r}"
    else:
        assert isinstance(problem, DecodeProblem)


@settings(PROPERTY, max_examples=300)
@given(valid_metadata(), junk())
def test_junk_seqlens_raise_only_named_errors(args, value):
    args["cache_seqlens"] = value
    try:
        check_metadata_args(**args)
    except (TypeError, ValueError) as exc:
        assert str(exc).startswith("cache_seqlens:"), exc


# --------------------------------------------------------------------------------------------
# The public functions: host arrays and foreign objects are refused before any GPU work.


def _no_gpu(*args, **kwargs):
    raise AssertionError("a refused argument must not reach the GPU")


@contextlib.contextmanager
def gpu_untouchable():
    """Every CUDA entry point the public functions reach after their checks raises."""
    import cupy

    from mla_cupy import _interop, interface

    with contextlib.ExitStack() as stack:
        for target, attr in [(cupy.cuda.runtime, "getDevice"), (cupy.cuda, "get_current_stream"),
                             (cupy, "from_dlpack"), (_interop, "current_device"),
                             (_interop, "_resolve_stream"), (interface, "_check_device")]:
            stack.enter_context(mock.patch.object(target, attr, _no_gpu))
        yield


CUDA_STANDIN = DLPackJunk((2, 0))  # an unknown framework's CUDA array on device 0

# Values that are not CUDA arrays: each must be named in a TypeError.
HOST_OR_FOREIGN = st.one_of(
    numpy_array(), st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
    odd_array(), st.builds(FakeArray, st.just((2, 3)), st.sampled_from(ALL_DTYPES)),
    st.builds(DLPackJunk, st.sampled_from([(1, 0), (3, 0), (10, 0), None, (2,), "cuda", 5,
                                           RuntimeError("no device")])),
)


@st.composite
def public_decode_args(draw):
    """Each array argument None, a CUDA stand-in or a host/foreign object; at least one of the
    latter. Returns (arguments, name of the first host/foreign one).

    (With every array None the functions ask CuPy for the current device before any check, so
    that case is not drawn: without a GPU it ends in CuPy's own error, not a named one.)"""
    args, first = {}, None
    kinds = draw(st.lists(st.sampled_from(["none", "cuda", "bad"]), min_size=len(ARRAY_ARGS),
                          max_size=len(ARRAY_ARGS)))
    if "bad" not in kinds:
        kinds[draw(st.integers(0, len(kinds) - 1))] = "bad"
    for name, kind in zip(ARRAY_ARGS, kinds):
        if kind == "bad":
            args[name] = draw(HOST_OR_FOREIGN)
            first = first or name
        else:
            args[name] = CUDA_STANDIN if kind == "cuda" else None
    return args, first


@settings(PROPERTY, max_examples=200)
@given(public_decode_args())
def test_public_decode_refuses_host_and_foreign_arrays(case):
    from mla_cupy import flash_mla_with_kvcache

    args, first = case
    out, lse = args.pop("out"), args.pop("lse")
    with gpu_untouchable(), pytest.raises(TypeError) as info:
        flash_mla_with_kvcache(**args, head_dim_v=512, out=out, lse=lse)
    assert str(info.value).startswith(f"{first}: expected a CUDA array"), info.value


@PROPERTY
@given(HOST_OR_FOREIGN, st.integers(-2, 64), st.integers(-2, 8))
def test_public_metadata_refuses_host_and_foreign_arrays(seqlens, tokens, heads):
    from mla_cupy import get_mla_metadata

    with gpu_untouchable(), pytest.raises(TypeError) as info:
        get_mla_metadata(seqlens, tokens, heads)
    assert str(info.value).startswith("cache_seqlens: expected a CUDA array"), info.value


BAD_STREAMS = st.one_of(
    st.sampled_from([True, False, 1.5, "0", b"", [0], (0, 0), object()]),
    st.integers(max_value=-1),
    st.builds(OddArray, __cuda_stream__=st.sampled_from([
        lambda: (1, 0), lambda: (0,), lambda: [0, 0], lambda: (0, "0"), lambda: (0, True),
        lambda: None])),
)


@PROPERTY
@given(BAD_STREAMS, st.booleans())
def test_public_functions_refuse_bad_streams_before_any_gpu_work(stream, metadata):
    from mla_cupy import flash_mla_with_kvcache, get_mla_metadata

    with gpu_untouchable(), pytest.raises((TypeError, ValueError)) as info:
        if metadata:
            get_mla_metadata(CUDA_STANDIN, 1, 1, stream=stream)
        else:
            flash_mla_with_kvcache(*[CUDA_STANDIN] * 4, 512, CUDA_STANDIN, CUDA_STANDIN,
                                   stream=stream)
    assert_named(info, {"stream"})


@PROPERTY
@given(st.sampled_from(["yes", 1, 0, 1.0, [], "True"]), st.booleans())
def test_public_functions_refuse_a_bad_validate_flag(validate, metadata):
    from mla_cupy import flash_mla_with_kvcache, get_mla_metadata

    with gpu_untouchable(), pytest.raises(TypeError) as info:
        if metadata:
            get_mla_metadata(CUDA_STANDIN, 1, 1, validate=validate)
        else:
            flash_mla_with_kvcache(*[CUDA_STANDIN] * 4, 512, CUDA_STANDIN, CUDA_STANDIN,
                                   validate=validate)
    assert_named(info, {"validate"})
