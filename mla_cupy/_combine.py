"""The combine kernel (kernels/combine.cuh) as modules of their own, one per dtype and
head_dim_v: its variants and its launch. Families whose decode writes split partial results
(o_accum / lse_accum) finish with it."""

from . import _compile, _launch, _params
from .support import DTYPES, HEAD_DIMS

FILES = _compile.COMMON_FILES + ("combine.cuh",)
WARPS = 4  # per CTA; one warp merges one SLICE_COLUMNS-wide slice of a packed query row
LOADS = 8  # partial-output loads a warp keeps in flight
CTAS_PER_SM = 8  # resident CTAs per SM (the kernel's register budget)
SLICE_COLUMNS = 128


def expression(dtype, head_dim_v):
    return f"mla::combine_kernel<{head_dim_v}, {_compile.cpp_elem(dtype)}>"


def variant(dtype, head_dim_v):
    return _compile.Variant(f"combine_{_compile.dtype_tag(dtype)}_dv{head_dim_v}", (expression(dtype, head_dim_v),),
                            FILES, checks=(("mla::kCombineWarps", WARPS), ("mla::kCombineLoads", LOADS),
                                           ("mla::kCombineCtasPerSm", CTAS_PER_SM),
                                           ("mla::kCombineSliceColumns", SLICE_COLUMNS)))


def all_variants():
    return list({variant(dt, dv).name: variant(dt, dv) for dt in DTYPES for _, dv in HEAD_DIMS}.values())


class CombineLaunch:
    """The combine of one call signature: fixed parameter fields, grid and the loaded kernel.

    `out_strides` ([b, s_q, h_q] of out) and `lse_strides` ([b, h_q, s_q]) are in elements.
    `programmatic`: a programmatic dependent launch behind the decode (see ``_launch.Kernel``;
    the decode must call ``pdl_launch_dependents()``, the combine waits in ``pdl_wait()``).
    """

    def __init__(self, device_id, problem, out_strides, lse_strides, programmatic=False):
        p = problem
        shape, info = grid(p), _launch.device_info(device_id)
        shared = _spread_bytes(info, shape[0] * shape[1]) if programmatic else 0
        # The function's dynamic shared memory limit is one attribute for every plan: the
        # largest any plan asks (a plan setting its own would lower it under another's launch).
        fn = _launch.function(device_id, variant(p.dtype, p.head_dim_v), expression(p.dtype, p.head_dim_v),
                              _spread_bytes(info, 1) if programmatic else 0)
        params = _params.Block(
            _params.COMBINE_PARAMS, POINTERS, o_stride_b=out_strides[0], o_stride_s=out_strides[1],
            o_stride_h=out_strides[2], lse_stride_b=lse_strides[0], lse_stride_h=lse_strides[1],
            lse_stride_s=lse_strides[2], batch=p.batch, h_kv=p.h_kv, ngroups=p.ngroups, m=p.m)
        self.kernel = _launch.Kernel(fn, shape, (32 * WARPS,), shared, params, programmatic=programmatic)

    def __call__(self, stream, num_splits, o_accum, lse_accum, out, lse):
        """Launch on stream `stream` (an int address); every other argument is a device pointer."""
        self.kernel(stream, (num_splits, o_accum, lse_accum, out, lse))


_SMEM_RESERVED = 1024  # shared memory the hardware reserves per CTA


def _spread_bytes(info, ctas):
    """Dynamic shared memory (unused by the kernel) that lets at most ceil(ctas / SMs) combine CTAs
    share an SM. A programmatic combine is scheduled while the decode still runs, onto SMs as
    they free; without a limit the first few SMs to free would take up to CTAS_PER_SM CTAs each, and a
    small grid (one long request: few CTAs, each merging many splits) would run on a few SMs."""
    per_sm = max(1, -(-ctas // info.sms))
    if per_sm >= CTAS_PER_SM:
        return 0
    return info.smem_per_sm // (per_sm + 1) + 1 - _SMEM_RESERVED


# Fields of CombineParams written per launch, in struct order; the rest are fixed per plan.
POINTERS = ("num_splits", "o_accum", "lse_accum", "out", "lse")


def grid(problem):
    """(x, y) of the combine launch: requests times slice groups of a packed row, and KV heads."""
    units = problem.m * (problem.head_dim_v // SLICE_COLUMNS)
    return (problem.batch * ((units + WARPS - 1) // WARPS), problem.h_kv)
