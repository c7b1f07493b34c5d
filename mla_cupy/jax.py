"""Experimental: ``get_mla_metadata`` and ``flash_mla_with_kvcache`` usable inside ``jax.jit``.

``mla_cupy.get_mla_metadata`` / ``mla_cupy.flash_mla_with_kvcache`` take concrete JAX arrays
through DLPack and launch on their own; a traced array has no memory, so they cannot run inside
``jax.jit``. This module offers the same two calls as JAX primitives: each lowers to XLA custom
calls (jaxlib's GPU kernel-call target, the one jax-triton uses) that launch mla_cupy's kernels,
built by NVRTC as PTX when the computation is lowered. No build step: the custom-call target
ships with jaxlib's CUDA plugin.

* Portable kernel family only (kernels/decode_sm80.cuh, through the flat-argument entries of
  kernels/jax_entry.cuh): the Hopper kernel needs a TMA descriptor made per call on the host.
* A decode is two custom calls: the decode, whose results are the split-KV workspace
  (``o_accum``, ``lse_accum``, fp32, allocated by XLA; every request goes there, single-split
  ones too), and the combine, which merges that workspace into ``out`` / ``lse``, every row. No
  buffer is both an operand and a result (XLA did not keep such an alias inside ``lax.scan``).
* Shapes are static. ``get_mla_metadata`` needs the GPU's SM count at trace time (it sets the
  number of schedule rows): from CuPy, else from JAX's device attributes, or ``device=``.
* No autodiff and no ``vmap``; the results are ordinary JAX arrays.

Needs JAX with its CUDA plugin (``jax[cuda12]`` / ``jax[cuda13]``), and NVRTC (through CuPy)
when a computation is lowered; ``jax.eval_shape`` needs neither a GPU nor NVRTC.
"""

import functools
import types
import zlib

import numpy as np

try:
    import jax
    import jax.numpy as jnp
    from jax.interpreters import batching, mlir
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"mla_cupy.jax needs JAX ({exc}); install jax, with its CUDA plugin to run on a GPU") from exc

from . import _flat, _launch, _params, _portable, _validate
from ._errors import UnsupportedDeviceError
from ._select import METADATA_PROBLEM, Problem
from .scheduler import num_sm_parts
from .support import LSE_DTYPE, MIN_COMPUTE_CAPABILITY, SCHED_METADATA_SIZE

__all__ = ["DeviceInfo", "device_info", "flash_mla_with_kvcache", "get_mla_metadata"]

#: What the route sizes its launches for: compute capability as an int (e.g. 90), SMs, opt-in
#: shared memory per block and shared memory per SM (bytes).
DeviceInfo = _launch.DeviceInfo

# Shared memory (opt-in per block, per SM) by compute capability, for when CuPy cannot be asked;
# an unknown GPU gets the smallest class.
_SMEM_BY_CC = {80: (166912, 167936), 86: (101376, 102400), 87: (166912, 167936), 89: (101376, 102400),
               90: (232448, 233472), 100: (232448, 233472), 103: (232448, 233472), 120: (101376, 102400)}
_SMEM_DEFAULT = (101376, 102400)


def device_info(device=None):
    """The ``DeviceInfo`` the route sizes its launches for.

    `device`: a ``DeviceInfo`` (returned as is: lets a machine without the GPU trace and lower
    for it), a JAX device, a CUDA device ordinal, or None for the first GPU JAX sees. Asks CuPy
    about the device, else JAX's device attributes (``compute_capability``, ``core_count``)
    with shared memory from a table. Raises UnsupportedDeviceError when there is no GPU.
    """
    if isinstance(device, DeviceInfo):
        return device
    if device is None:
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        if not gpus:
            raise UnsupportedDeviceError(
                "mla_cupy.jax: JAX sees no GPU; pass device=mla_cupy.jax.DeviceInfo(cc, sms, smem_per_block, "
                "smem_per_sm) to trace and lower for one")
        device = gpus[0]
    if isinstance(device, (int, np.integer)) and not isinstance(device, bool):
        ordinal, jax_device = int(device), None
    else:
        ordinal, jax_device = getattr(device, "local_hardware_id", None), device
        if ordinal is None:
            ordinal = getattr(device, "id", 0)
    try:
        return _launch.device_info(int(ordinal))
    except Exception as exc:  # noqa: BLE001 - no CuPy, no driver: fall back to JAX's attributes
        cupy_error = exc
    cc = getattr(jax_device, "compute_capability", None)
    sms = getattr(jax_device, "core_count", None)
    if cc is None or sms is None:
        raise UnsupportedDeviceError(
            f"mla_cupy.jax: cannot tell the compute capability and SM count of device {device!r} "
            f"(CuPy: {cupy_error}); pass device=mla_cupy.jax.DeviceInfo(...)")
    major, _, minor = str(cc).partition(".")
    cc = int(major) * 10 + int(minor or 0)
    smem_block, smem_sm = _SMEM_BY_CC.get(cc, _SMEM_DEFAULT)
    return DeviceInfo(cc, int(sms), smem_block, smem_sm)


def _check_cc(info):
    need = MIN_COMPUTE_CAPABILITY[0] * 10 + MIN_COMPUTE_CAPABILITY[1]
    if info.cc < need:
        raise UnsupportedDeviceError(
            f"mla_cupy.jax: compute capability {info.cc // 10}.{info.cc % 10} is older than the "
            f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} mla_cupy needs")


# ---- argument checks on shapes and dtypes (a traced array has no strides or pointer) ----------

class _Spec:
    """What the validators read of an array, for a JAX array or tracer: its shape and dtype, with
    the C-contiguous strides and the aligned pointer XLA gives a custom call's buffers."""

    def __init__(self, x):
        self.shape = tuple(int(n) for n in x.shape)
        self.dtype = np.dtype(x.dtype)
        self.strides = tuple(int(s) * self.dtype.itemsize for s in _params.element_strides(None, self.shape, 1))
        self.data = types.SimpleNamespace(ptr=0)


def _spec(x):
    if x is None or not (hasattr(x, "shape") and hasattr(x, "dtype")):
        return x  # the validators name what it is
    return _Spec(x)


# ---- primitives -----------------------------------------------------------------------------------

def _primitive(name, multiple_results=True):
    try:
        from jax.extend.core import Primitive
    except ImportError:  # older JAX
        from jax.core import Primitive
    prim = Primitive(name)
    prim.multiple_results = multiple_results

    def impl(*args, **params):  # outside jit: compile the one primitive and run it
        try:
            from jax._src.dispatch import apply_primitive
        except ImportError:  # pragma: no cover - a JAX without it: jit the bind
            return jax.jit(functools.partial(prim.bind, **params))(*args)
        return apply_primitive(prim, *args, **params)

    def no_vmap(*args, **params):
        raise NotImplementedError(f"{name} (mla_cupy.jax) has no batching rule: call it on whole batches, "
                                  "outside jax.vmap")

    prim.def_impl(impl)
    batching.primitive_batchers[prim] = no_vmap
    return prim


def _shaped(shape, dtype):
    try:
        from jax.core import ShapedArray
    except ImportError:  # a JAX that keeps it private
        from jax._src.core import ShapedArray
    return ShapedArray(tuple(shape), np.dtype(dtype))


_metadata_p = _primitive("mla_cupy_metadata")
_decode_p = _primitive("mla_cupy_decode")
_combine_p = _primitive("mla_cupy_combine")


@_metadata_p.def_abstract_eval
def _metadata_abstract(seqlens, *, num_sm_parts, device):
    return (_shaped((num_sm_parts, SCHED_METADATA_SIZE), np.int32), _shaped((seqlens.shape[0] + 1,), np.int32))


@_decode_p.def_abstract_eval
def _decode_abstract(q, k_cache, block_table, cache_seqlens, sched, num_splits, *, problem, device):
    rows = _flat.workspace_rows(problem)
    return _shaped((rows, problem.head_dim_v), np.float32), _shaped((rows,), np.float32)


@_combine_p.def_abstract_eval
def _combine_abstract(num_splits, o_accum, lse_accum, *, problem, device):
    pb = problem
    return (_shaped((pb.batch, pb.s_q, pb.h_q, pb.head_dim_v), pb.dtype),
            _shaped((pb.batch, pb.h_q, pb.s_q), LSE_DTYPE))


# ---- lowering: jaxlib's GPU kernel-call custom call ----------------------------------------------

_FFI_TARGET = "triton_kernel_call_ffi"  # typed-FFI handler (api_version 4, attribute "opaque")
_LEGACY_TARGET = "triton_kernel_call"  # older handler (api_version 2, the opaque as backend_config)


def _gpu_triton():
    try:
        from jax._src.lib import gpu_triton
    except ImportError as exc:
        raise UnsupportedDeviceError(
            f"mla_cupy.jax: jaxlib's GPU kernel-call library cannot be imported ({exc}); install JAX's CUDA "
            "plugin (jax[cuda12] or jax[cuda13])") from None
    if not hasattr(gpu_triton, "TritonKernelCall"):
        raise UnsupportedDeviceError(
            "mla_cupy.jax: jaxlib has no CUDA kernel-call library (jax_cuda12_plugin or jax_cuda13_plugin "
            "missing); install JAX's CUDA plugin (jax[cuda12] or jax[cuda13])")
    return gpu_triton


def _custom_call_target(lib):
    """(target name, API version): the typed-FFI target where this jaxlib registers it, else the
    older status-returning one."""
    cuda = getattr(lib, "_cuda_triton", None)
    registrations = getattr(cuda, "registrations", None)
    try:
        names = set(registrations()) if callable(registrations) else set()
    except Exception:  # noqa: BLE001 - an unexpected registry: use the older target
        names = set()
    return (_FFI_TARGET, 4) if _FFI_TARGET in names else (_LEGACY_TARGET, 2)


def _triton_kernel(lib, name, num_warps, shared_bytes, ptx, cc):
    """jaxlib's TritonKernel: (name, num_warps, num_ctas, shared memory, PTX, TTIR, cc) in current
    jaxlib; (name, num_warps, shared memory, PTX, TTIR, cc, cluster dims) in older ones."""
    try:
        return lib.TritonKernel(name, num_warps, 1, shared_bytes, ptx, "", cc)
    except TypeError:
        return lib.TritonKernel(name, num_warps, shared_bytes, ptx, "", cc, 1, 1, 1)


def kernel_call_opaque(variant, *, num_warps, shared_bytes, grid, struct, scalars, buffers, cc, call_name,
                       null_fields=()):
    """The zlib-compressed kernel-call proto of one launch of `variant`'s flat entry: its PTX and
    kernel name, block ``32 * num_warps`` (1-D), `shared_bytes` of dynamic shared memory, `grid`,
    and one parameter per argument of ``_flat.arguments(struct)``: a buffer (`buffers`: the
    custom call's operand then result avals, taken in order), a null pointer for a pointer field
    in `null_fields` (one the entry does not use), or a scalar from `scalars`."""
    lib = _gpu_triton()
    ptx, kernel_name = _flat.ptx(variant)
    kernel = _triton_kernel(lib, kernel_name, num_warps, shared_bytes, ptx, cc)
    params, pending = [], list(buffers)
    for field, kind in _flat.arguments(struct):
        if kind == "array" and field in null_fields:
            params.append(lib.create_scalar_parameter(0, "i64"))
        elif kind == "array":
            aval = pending.pop(0)
            params.append(lib.create_array_parameter(0, _flat.alignment(field, np.dtype(aval.dtype).itemsize)))
        else:
            value = scalars[field]
            params.append(lib.create_scalar_parameter(float(value) if kind == "fp32" else int(value), kind))
    grid = tuple(grid) + (1,) * (3 - len(grid))
    call = lib.TritonKernelCall(kernel, grid[0], grid[1], grid[2], params)
    return zlib.compress(call.to_proto(call_name, b""))


def _ir_type(ctx, aval):
    try:  # current JAX: (module context, aval)
        return mlir.aval_to_ir_type(ctx.module_context, aval)
    except TypeError:  # older JAX: (aval)
        return mlir.aval_to_ir_type(aval)


def _row_major(avals):
    return [tuple(range(len(a.shape) - 1, -1, -1)) for a in avals]


def _emit(ctx, operands, opaque):
    target, api_version = _custom_call_target(_gpu_triton())
    if api_version >= 4:
        rule = jax.ffi.ffi_lowering(target)
        return rule(ctx, *operands, opaque=opaque)
    from jax._src.interpreters import mlir as mlir_internal

    return mlir_internal.custom_call(
        target, result_types=[_ir_type(ctx, a) for a in ctx.avals_out], operands=list(operands),
        backend_config=opaque, api_version=api_version, operand_layouts=_row_major(ctx.avals_in),
        result_layouts=_row_major(ctx.avals_out)).results


def _metadata_lowering(ctx, seqlens, *, num_sm_parts, device):
    batch = int(ctx.avals_in[0].shape[0])
    opaque = kernel_call_opaque(
        _flat.metadata_variant(), num_warps=1, shared_bytes=0, grid=(1,), struct=_params.METADATA_PARAMS,
        scalars=_flat.metadata_scalars(batch, num_sm_parts), buffers=[*ctx.avals_in, *ctx.avals_out],
        cc=device.cc, call_name="mla_cupy_metadata")
    return _emit(ctx, [seqlens], opaque)


def _decode_config(pb, info):
    cfg = _portable.supports(info, Problem(pb.dtype, pb.head_dim, pb.head_dim_v, pb.m, pb.page_block_size))
    if cfg is None:
        raise UnsupportedDeviceError(f"mla_cupy.jax: the portable kernel cannot run this problem: "
                                     f"{_portable.why_not(info, pb)}")
    return cfg


def _decode_lowering(ctx, *operands, problem, device):
    pb, info = problem, device_info(device)
    _check_cc(info)
    cfg = _decode_config(pb, info)
    opaque = kernel_call_opaque(
        _flat.decode_variant(pb.dtype, pb.head_dim, pb.head_dim_v, cfg), num_warps=cfg.threads // 32,
        shared_bytes=cfg.smem_bytes, grid=_flat.decode_grid(pb, cfg), struct=_params.DECODE_PARAMS,
        scalars=_flat.decode_scalars(pb), buffers=[*ctx.avals_in, *ctx.avals_out], cc=info.cc,
        call_name="mla_cupy_decode", null_fields=("out", "lse"))
    return _emit(ctx, operands, opaque)


def _combine_lowering(ctx, *operands, problem, device):
    pb, info = problem, device_info(device)
    from . import _combine

    opaque = kernel_call_opaque(
        _flat.combine_variant(pb.dtype, pb.head_dim_v), num_warps=_combine.WARPS, shared_bytes=0,
        grid=_flat.combine_grid(pb), struct=_params.COMBINE_PARAMS, scalars=_flat.combine_scalars(pb),
        buffers=[*ctx.avals_in, *ctx.avals_out], cc=info.cc, call_name="mla_cupy_combine")
    return _emit(ctx, operands, opaque)


def _not_on_this_platform(ctx, *operands, **params):
    platforms = ", ".join(ctx.module_context.platforms)
    raise UnsupportedDeviceError(f"mla_cupy.jax runs on CUDA GPUs only; this computation is lowered for {platforms} "
                                 "(put its inputs on a GPU, or use jax.eval_shape to trace it elsewhere)")


for _prim, _rule in ((_metadata_p, _metadata_lowering), (_decode_p, _decode_lowering),
                     (_combine_p, _combine_lowering)):
    mlir.register_lowering(_prim, _rule, platform="cuda")
    mlir.register_lowering(_prim, _not_on_this_platform)


# ---- the public calls -------------------------------------------------------------------------------

def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None, is_fp8_kvcache=False,
                     topk=None, *, device=None):
    """``mla_cupy.get_mla_metadata`` as a JAX primitive: usable inside ``jax.jit``.

    Returns ``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [batch + 1])``.
    ``num_sm_parts`` is fixed at trace time from the GPU's SM count and the portable kernel's
    CTAs per SM (`device`: see :func:`device_info`).
    """
    _validate.check_metadata_args(_spec(cache_seqlens), num_q_tokens_per_head_k, num_heads_k, num_heads_q,
                                  is_fp8_kvcache, topk)
    info = device_info(device)
    _check_cc(info)
    m, h_kv = int(num_q_tokens_per_head_k), int(num_heads_k)
    cfg = _portable.supports(info, Problem(m=m, **METADATA_PROBLEM))
    if cfg is None:
        raise UnsupportedDeviceError(f"mla_cupy.jax: the portable kernel cannot run on this device: "
                                     f"{info.smem_per_block} bytes of shared memory per block are too few")
    parts = num_sm_parts(info.sms * cfg.ctas_per_sm, m, h_kv)
    sched, num_splits = _metadata_p.bind(jnp.asarray(cache_seqlens), num_sm_parts=parts, device=info)
    return sched, num_splits


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                           softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None, *, device=None):
    """``mla_cupy.flash_mla_with_kvcache`` as JAX primitives (decode, then combine): usable
    inside ``jax.jit``, on the portable kernel. Same arguments, checks and results
    ``(out [batch, s_q, h_q, head_dim_v] of q's dtype, lse float32 [batch, h_q, s_q])``.

    `device` (see :func:`device_info`) sizes the launch (tile, pipeline stages); by default it
    is looked up when the computation is lowered, so ``jax.eval_shape`` needs no GPU.
    """
    arrays = (q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits)
    pb = _validate.check_decode_args(
        _spec(q), _spec(k_cache), _spec(block_table), _spec(cache_seqlens), head_dim_v,
        _spec(tile_scheduler_metadata), _spec(num_splits), softmax_scale, causal, is_fp8_kvcache, indices,
        None, None)
    info = None if device is None else device_info(device)
    if info is not None:
        _check_cc(info)
        _decode_config(pb, info)
    q, k_cache, block_table, cache_seqlens, sched, num_splits = (jnp.asarray(x) for x in arrays)
    o_accum, lse_accum = _decode_p.bind(q, k_cache, block_table, cache_seqlens, sched, num_splits, problem=pb,
                                        device=info)
    out, lse = _combine_p.bind(num_splits, o_accum, lse_accum, problem=pb, device=info)
    return out, lse
