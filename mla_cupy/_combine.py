"""The combine kernel (kernels/combine.cuh) as modules of their own, one per dtype and
head_dim_v: its variants and its launch. Families whose decode writes split partial results
(o_accum / lse_accum) finish with it."""

from . import _compile, _launch, _params
from .support import DTYPES, HEAD_DIMS

FILES = _compile.COMMON_FILES + ("combine.cuh",)
WARPS = 8  # per CTA; one warp merges one SLICE_COLUMNS-wide slice of a packed query row
SLICE_COLUMNS = 128


def expression(dtype, head_dim_v):
    return f"mla::combine_kernel<{head_dim_v}, {_compile.cpp_bool(dtype)}>"


def variant(dtype, head_dim_v):
    return _compile.Variant(f"combine_{_compile.dtype_tag(dtype)}_dv{head_dim_v}", (expression(dtype, head_dim_v),),
                            FILES, checks=(("mla::kCombineWarps", WARPS), ("mla::kCombineSliceColumns", SLICE_COLUMNS)))


def all_variants():
    return list({variant(dt, dv).name: variant(dt, dv) for dt in DTYPES for _, dv in HEAD_DIMS}.values())


class CombineLaunch:
    """The combine of one call signature: fixed parameter fields, grid and the loaded kernel.

    `out_strides` ([b, s_q, h_q] of out) and `lse_strides` ([b, h_q, s_q]) are in elements.
    """

    def __init__(self, device_id, problem, out_strides, lse_strides):
        p = problem
        self._fn = _launch.function(device_id, variant(p.dtype, p.head_dim_v), expression(p.dtype, p.head_dim_v))
        self._template = _params.Template(
            _params.COMBINE_PARAMS, o_stride_b=out_strides[0], o_stride_s=out_strides[1], o_stride_h=out_strides[2],
            lse_stride_b=lse_strides[0], lse_stride_h=lse_strides[1], lse_stride_s=lse_strides[2],
            batch=p.batch, h_kv=p.h_kv, ngroups=p.ngroups, m=p.m)
        units = p.m * (p.head_dim_v // SLICE_COLUMNS)
        self._grid = (p.batch * ((units + WARPS - 1) // WARPS), p.h_kv)
        self._block = (32 * WARPS,)

    def __call__(self, stream, num_splits, o_accum, lse_accum, out, lse):
        """Launch on `stream`; every argument is a device pointer (int)."""
        params = self._template.pack(num_splits=num_splits, o_accum=o_accum, lse_accum=lse_accum, out=out, lse=lse)
        self._fn(self._grid, self._block, (params,), 0, stream)
