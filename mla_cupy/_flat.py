"""The flat-argument entry points of kernels/jax_entry.cuh: their variants, argument lists and
PTX. The experimental ``mla_cupy.jax`` route launches them through jaxlib's GPU kernel-call
custom call; this module needs neither JAX nor a GPU (NVRTC builds the PTX), so the compile lane
checks it without JAX.

Each entry takes the fields of its parameter block (``_params``) as separate arguments, in the
struct's order, pad fields left out: the pointer fields are the custom call's buffers (operands
then results, in that order), the rest are scalars. ``arguments(struct)`` is that list, so the
launcher's parameter list and the C signature come from one place.

Only the portable decode family (kernels/decode_sm80.cuh) has a flat entry: the Hopper kernel
takes a TMA descriptor made on the host per call, which the flat launcher cannot build.
"""

import functools
import re

import numpy as np

from . import _combine, _compile, _metadata, _params, _portable
from ._errors import CompileError
from .support import DTYPES, HEAD_DIMS, SCHED_BLOCK_TOKENS, SCHED_FIXED_OVERHEAD_BLOCKS

FILES = _compile.COMMON_FILES + ("scheduler.cuh", "combine.cuh", "decode_sm80.cuh", "jax_entry.cuh")

# The PTX every flat module is built as: the oldest arch mla_cupy supports, so one PTX serves
# every GPU (the custom call's launcher compiles it with ptxas for the GPU at hand).
PTX_ARCH = "compute_80"
# The PTX ISA version the flat PTX declares. NVRTC writes its own (9.5 for NVRTC 13.5), and a
# ptxas older than that NVRTC refuses the file ("Unsupported .version"), while the ptxas that
# runs it is whichever one JAX's CUDA plugin brings: CUDA 12.6 or newer (ISA 8.5) for
# jax-cuda12-plugin, 13.0 or newer for jax-cuda13-plugin. So a newer directive is lowered to
# 8.5. The kernels' own instructions need ISA 7.0 (sm_80); what NVRTC adds on top are hints
# such as `.pragma "used_bytes_mask"` (ISA 8.3); a ptxas meeting anything newer says which.
PTX_ISA_VERSION = (8, 5)

METADATA_KERNEL = "mla::metadata_flat_kernel"

# Custom-call argument kinds of the struct's scalar fields (jaxlib's scalar parameter names).
_SCALAR_KINDS = {np.dtype(np.int64): "i64", np.dtype(np.int32): "i32", np.dtype(np.float32): "fp32"}
# PTX parameter type of each kind (what the compile lane reads back from the entry's signature).
PTX_TYPES = {"array": ".u64", "i64": ".u64", "i32": ".u32", "fp32": ".f32"}

# Pointer fields the kernels read or write 16 bytes at a time: the launcher checks their
# buffers' alignment before each launch (every other buffer is checked for its element size).
VECTOR_FIELDS = frozenset({"q", "kv", "out", "o_accum"})


def arguments(struct):
    """[(field, kind)] of the flat entry taking `struct` (a ``_params`` dtype): kind "array" for
    a pointer field (one custom-call buffer), else "i64", "i32" or "fp32"."""
    out = []
    for name in struct.names:
        if name.startswith("pad"):
            continue
        dt = struct.fields[name][0]
        out.append((name, "array" if dt == np.dtype(np.uint64) else _SCALAR_KINDS[dt]))
    return out


def alignment(field, dtype_itemsize):
    """Byte alignment the launcher checks for the buffer of pointer field `field`."""
    return 16 if field in VECTOR_FIELDS else dtype_itemsize


# ---- variants -----------------------------------------------------------------------------------

def decode_expression(dtype, head_dim, head_dim_v, cfg):
    return (f"mla::decode_flat_kernel<{head_dim}, {head_dim_v}, {cfg.m_tile}, {cfg.stages}, {cfg.warps_n}, "
            f"{cfg.m_tiles_per_warp}, {cfg.kv_tile}, {_compile.cpp_elem(dtype)}>")


def combine_expression(dtype, head_dim_v):
    return f"mla::combine_flat_kernel<{head_dim_v}, {_compile.cpp_elem(dtype)}>"


@functools.cache
def metadata_variant():
    return _compile.Variant("flat_metadata", (METADATA_KERNEL,), FILES,
                            checks=(("mla::kMetadataThreads", _metadata.THREADS), *_metadata.SCHEDULE_CHECKS))


@functools.cache
def decode_variant(dtype, head_dim, head_dim_v, cfg):
    """The flat decode module of one portable configuration (``_portable.DecodeConfig``), with
    the same compile-time checks as the portable decode's own module."""
    base = _portable.variant(dtype, head_dim, head_dim_v, cfg)
    return _compile.Variant(f"flat_{base.name}", (decode_expression(dtype, head_dim, head_dim_v, cfg),), FILES,
                            checks=base.checks)


@functools.cache
def combine_variant(dtype, head_dim_v):
    base = _combine.variant(dtype, head_dim_v)
    return _compile.Variant(f"flat_{base.name}", (combine_expression(dtype, head_dim_v),), FILES,
                            checks=base.checks)


def all_variants():
    """Every flat module a supported GPU can need (the portable family's configurations)."""
    out = {metadata_variant().name: metadata_variant()}
    for dtype in DTYPES:
        for d, dv in HEAD_DIMS:
            v = combine_variant(dtype, dv)
            out[v.name] = v
            for smem_block, smem_sm in _portable.SMEM_CLASSES:
                for m in _portable.M_TILES:
                    cfg = _portable.decode_config(d, m, smem_block, smem_sm)
                    if cfg is not None:
                        v = decode_variant(dtype, d, dv, cfg)
                        out[v.name] = v
    return list(out.values())


def declare_isa(text, version=PTX_ISA_VERSION):
    """`text` (PTX) with its ``.version`` directive lowered to `version` where it is newer."""
    match = re.search(r"^\.version\s+(\d+)\.(\d+)\s*$", text, re.M)
    if match is None:
        raise CompileError("NVRTC's PTX has no .version directive")
    if (int(match.group(1)), int(match.group(2))) <= tuple(version):
        return text
    return f"{text[:match.start()]}.version {version[0]}.{version[1]}{text[match.end():]}"


@functools.cache
def ptx(variant):
    """(PTX text, lowered kernel name) of `variant`, built by NVRTC for ``PTX_ARCH`` (or read
    from the library's kernel cache), declaring ISA ``PTX_ISA_VERSION``. Needs NVRTC, not a GPU."""
    build = _compile.build_cached(variant, PTX_ARCH)
    (expr,) = variant.name_expressions
    text = build.image.rstrip(b"\0").decode("ascii")
    return declare_isa(text), build.lowered_names[expr]


# ---- scalar arguments ---------------------------------------------------------------------------

def _c_strides(shape):
    return tuple(int(s) for s in _params.element_strides(None, shape, 1))


def metadata_scalars(batch, parts):
    """Scalar fields of MetadataParams for a batch split over `parts` parts."""
    return dict(batch=batch, num_sm_parts=parts, block_tokens=SCHED_BLOCK_TOKENS,
                fixed_overhead=SCHED_FIXED_OVERHEAD_BLOCKS)


def decode_scalars(pb):
    """Scalar fields of DecodeParams for problem `pb` (a ``_validate.DecodeProblem``) on
    C-contiguous arrays."""
    q = _c_strides((pb.batch, pb.s_q, pb.h_q, pb.head_dim))
    kv = _c_strides((pb.num_blocks, pb.page_block_size, pb.h_kv, pb.head_dim))
    o = _c_strides((pb.batch, pb.s_q, pb.h_q, pb.head_dim_v))
    lse = _c_strides((pb.batch, pb.h_q, pb.s_q))
    return dict(
        q_stride_b=q[0], q_stride_s=q[1], q_stride_h=q[2],
        kv_stride_block=kv[0], kv_stride_tok=kv[1], kv_stride_head=kv[2], bt_stride_b=pb.max_blocks_per_seq,
        o_stride_b=o[0], o_stride_s=o[1], o_stride_h=o[2],
        lse_stride_b=lse[0], lse_stride_h=lse[1], lse_stride_s=lse[2],
        batch=pb.batch, s_q=pb.s_q, h_q=pb.h_q, h_kv=pb.h_kv, ngroups=pb.ngroups, m=pb.m,
        page_size=pb.page_block_size, causal=int(pb.causal), scale_log2=float(pb.softmax_scale) * _params._LOG2E)


def combine_scalars(pb):
    o = _c_strides((pb.batch, pb.s_q, pb.h_q, pb.head_dim_v))
    lse = _c_strides((pb.batch, pb.h_q, pb.s_q))
    return dict(o_stride_b=o[0], o_stride_s=o[1], o_stride_h=o[2], lse_stride_b=lse[0], lse_stride_h=lse[1],
                lse_stride_s=lse[2], batch=pb.batch, h_kv=pb.h_kv, ngroups=pb.ngroups, m=pb.m)


def decode_grid(pb, cfg):
    return (-(-pb.m // cfg.m_tile), pb.h_kv, pb.num_sm_parts)


def combine_grid(pb):
    return tuple(_combine.grid(pb)) + (1,)


def workspace_rows(pb):
    """Rows of the split-KV workspace (o_accum [rows, head_dim_v], lse_accum [rows])."""
    return (pb.batch + pb.num_sm_parts) * pb.h_kv * pb.m
