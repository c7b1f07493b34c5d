"""NumPy structured dtypes mirroring the C parameter structs of kernels/params.cuh.

Each kernel takes one struct by value. The dtypes below are built with ``align=True`` so they
follow the C layout rules; ``static_asserts()`` renders a check of every offset and of the size,
which ``_compile`` places into each translation unit, so a drift between the two sides fails
the compile instead of corrupting a launch. NVRTC has no ``offsetof``, so offsets are checked
by ``offset_probe_source()``: a kernel whose PTX stores each field's offset as an immediate,
read back by the compile test lane.
"""

import ctypes
import struct

import numpy as np

_PTR = np.uint64
_I64 = np.int64
_I32 = np.int32
_F32 = np.float32

DECODE_PARAMS = np.dtype(
    [
        ("q", _PTR), ("kv", _PTR), ("block_table", _PTR), ("seqlens", _PTR),
        ("sched", _PTR), ("num_splits", _PTR), ("out", _PTR), ("lse", _PTR),
        ("o_accum", _PTR), ("lse_accum", _PTR),
        ("q_stride_b", _I64), ("q_stride_s", _I64), ("q_stride_h", _I64),
        ("kv_stride_block", _I64), ("kv_stride_tok", _I64), ("kv_stride_head", _I64),
        ("bt_stride_b", _I64),
        ("o_stride_b", _I64), ("o_stride_s", _I64), ("o_stride_h", _I64),
        ("lse_stride_b", _I64), ("lse_stride_h", _I64), ("lse_stride_s", _I64),
        ("batch", _I32), ("s_q", _I32), ("h_q", _I32), ("h_kv", _I32),
        ("ngroups", _I32), ("m", _I32), ("page_size", _I32), ("causal", _I32),
        ("scale_log2", _F32), ("pad0", _I32),
    ],
    align=True,
)

COMBINE_PARAMS = np.dtype(
    [
        ("num_splits", _PTR), ("o_accum", _PTR), ("lse_accum", _PTR), ("out", _PTR), ("lse", _PTR),
        ("o_stride_b", _I64), ("o_stride_s", _I64), ("o_stride_h", _I64),
        ("lse_stride_b", _I64), ("lse_stride_h", _I64), ("lse_stride_s", _I64),
        ("batch", _I32), ("h_kv", _I32), ("ngroups", _I32), ("m", _I32),
    ],
    align=True,
)

METADATA_PARAMS = np.dtype(
    [
        ("seqlens", _PTR), ("sched", _PTR), ("num_splits", _PTR),
        ("batch", _I32), ("num_sm_parts", _I32), ("block_tokens", _I32), ("fixed_overhead", _I32),
    ],
    align=True,
)

STRUCTS = {"DecodeParams": DECODE_PARAMS, "CombineParams": COMBINE_PARAMS, "MetadataParams": METADATA_PARAMS}


def static_asserts():
    """C++ source asserting that every struct in STRUCTS has its NumPy dtype's size."""
    lines = ["namespace mla {"]
    for name, dt in STRUCTS.items():
        lines.append(f'static_assert(sizeof({name}) == {dt.itemsize}, "{name}: size differs from _params.py");')
    lines.append("}  // namespace mla")
    return "\n".join(lines) + "\n"


def offset_probe_source():
    """A kernel storing offset(field) into out[k] for every field of every struct, in order.

    Compiled to PTX, each store's value is a literal; the compile lane compares them with the
    dtype offsets.
    """
    lines = ["namespace mla {", 'extern "C" __global__ void params_offset_probe(int* out) {']
    k = 0
    for name, dt in STRUCTS.items():
        lines.append(f"  {{ const {name}* s = nullptr;")
        for field in dt.names:
            lines.append(f"    out[{k}] = int(reinterpret_cast<const char*>(&s->{field}) - reinterpret_cast<const char*>(s));")
            k += 1
        lines.append("  }")
    lines += ["}", "}  // namespace mla"]
    return "\n".join(lines) + "\n"


def expected_offsets():
    """[(struct, field, offset)] in the order offset_probe_source() stores them."""
    return [(name, f, dt.fields[f][1]) for name, dt in STRUCTS.items() for f in dt.names]


class Template:
    """A parameter block whose fields are fixed but for a few set per launch (the pointers).

    ``Template(dtype, **static).pack(**dynamic)`` costs one small NumPy array construction;
    every field must be given exactly once across the two (pad fields default to zero).
    """

    def __init__(self, dtype, **static):
        unknown = [k for k in static if k not in dtype.names]
        if unknown:
            raise ValueError(f"parameter block {dtype.names}: unknown fields {unknown}")
        self.dtype = dtype
        self._values = [static.get(f, 0) for f in dtype.names]
        self._slot = {f: i for i, f in enumerate(dtype.names)}
        self._dynamic = frozenset(f for f in dtype.names if f not in static and not f.startswith("pad"))
        self._void = np.dtype((np.void, dtype.itemsize))

    def pack(self, **dynamic):
        if dynamic.keys() != self._dynamic:
            raise ValueError(f"parameter block {self.dtype.names}: expected fields {sorted(self._dynamic)}, "
                             f"got {sorted(dynamic)}")
        values = self._values.copy()
        for key, value in dynamic.items():
            values[self._slot[key]] = value
        return np.array(tuple(values), dtype=self.dtype).reshape(1).view(self._void)[0]



class Block:
    """A parameter block kept as one writable byte image for the life of a launch plan: the
    fixed fields are written once, and each launch overwrites only the pointer fields named in
    `dynamic` (consecutive 8-byte fields, in struct order) with one ``struct.pack_into``.

    ``address`` is the image's host address (what ``cuLaunchKernelEx`` reads the argument
    from); ``value()`` is a copy as a NumPy void scalar (a CuPy kernel call's argument).
    """

    def __init__(self, dtype, dynamic, **static):
        unknown = [k for k in (*dynamic, *static) if k not in dtype.names]
        if unknown:
            raise ValueError(f"parameter block {dtype.names}: unknown fields {unknown}")
        missing = [f for f in dtype.names if f not in static and f not in dynamic and not f.startswith("pad")]
        if missing or set(dynamic) & set(static):
            raise ValueError(f"parameter block {dtype.names}: every field is fixed or set per launch, once; "
                             f"missing {missing}")
        offsets = [dtype.fields[f][1] for f in dynamic]
        if any(dtype.fields[f][0] != np.dtype(_PTR) for f in dynamic) or \
                offsets != list(range(offsets[0], offsets[0] + 8 * len(dynamic), 8)):
            raise ValueError(f"parameter block {dtype.names}: per-launch fields {dynamic} must be consecutive "
                             "pointer fields")
        image = np.zeros(1, dtype=dtype)
        for key, value in static.items():
            image[key] = value
        self.dtype, self.dynamic = dtype, tuple(dynamic)
        self.buffer = ctypes.create_string_buffer(image.tobytes(), dtype.itemsize)
        self.address = ctypes.addressof(self.buffer)
        self._offset = offsets[0]
        self._packer = struct.Struct(f"<{len(dynamic)}Q")

    def set(self, values):
        """Write the per-launch pointers (ints, in the order of `dynamic`)."""
        self._packer.pack_into(self.buffer, self._offset, *values)

    def value(self):
        """The current image as a NumPy structured scalar (a copy)."""
        return np.frombuffer(self.buffer.raw, dtype=self.dtype)[0]

    def fields(self):
        """The current image as {field: value} (for tests and debugging)."""
        v = self.value()
        return {f: v[f].item() for f in self.dtype.names}


# ---- the decode parameter block (every decode family's kernel takes DecodeParams) -------------

_LOG2E = 1.4426950408889634

# Fields of DecodeParams written per launch, in struct order: the six inputs (INPUTS), then
# out, lse, o_accum, lse_accum. The rest are fixed per call signature.
DECODE_POINTERS = ("q", "kv", "block_table", "seqlens", "sched", "num_splits", "out", "lse", "o_accum", "lse_accum")
INPUTS = ("q", "k_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata", "num_splits")


def input_pointers(arrays):
    """Device pointers of the INPUTS of `arrays` (CuPy arrays by argument name)."""
    return tuple(arrays[name].data.ptr for name in INPUTS)


def element_strides(x, shape, itemsize):
    """Strides of array `x` in elements, or C-contiguous ones of `shape` when `x` is None."""
    if x is not None:
        return tuple(s // itemsize for s in x.strides)
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def decode_block(arrays, problem):
    """The DecodeParams Block of one call signature, and the out / lse strides (elements) the
    combine needs. `arrays` are the call's CuPy arrays by argument name, `problem` the validated
    ``_validate.DecodeProblem``; out / lse strides are those of ``arrays["out"]`` /
    ``arrays["lse"]``, or C-contiguous when they are None."""
    pb, a = problem, arrays
    q, kv, es = a["q"], a["k_cache"], a["q"].itemsize
    out_strides = element_strides(a["out"], (pb.batch, pb.s_q, pb.h_q, pb.head_dim_v), es)
    lse_strides = element_strides(a["lse"], (pb.batch, pb.h_q, pb.s_q), 4)
    block = Block(
        DECODE_PARAMS, DECODE_POINTERS,
        o_stride_b=out_strides[0], o_stride_s=out_strides[1], o_stride_h=out_strides[2],
        lse_stride_b=lse_strides[0], lse_stride_h=lse_strides[1], lse_stride_s=lse_strides[2],
        batch=pb.batch, h_kv=pb.h_kv, ngroups=pb.ngroups, m=pb.m,
        q_stride_b=q.strides[0] // es, q_stride_s=q.strides[1] // es, q_stride_h=q.strides[2] // es,
        kv_stride_block=kv.strides[0] // es, kv_stride_tok=kv.strides[1] // es,
        kv_stride_head=kv.strides[2] // es, bt_stride_b=a["block_table"].strides[0] // 4,
        s_q=pb.s_q, h_q=pb.h_q, page_size=pb.page_block_size, causal=int(pb.causal),
        scale_log2=pb.softmax_scale * _LOG2E)
    return block, out_strides, lse_strides
