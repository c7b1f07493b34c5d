"""Launchers: grid, block, shared memory and stream for each kernel; nothing else.

Arguments arrive validated (``_validate``) and packed (``_params``); modules come from
``_compile.get_module``. Every launch names its stream explicitly (the loaded function's
``stream=`` argument), never relying on CuPy's current stream.
"""

import functools

from . import _compile

COMBINE_WARPS = 8  # kernels/combine.cuh: one warp per 128-column slice of a packed query row
COMBINE_SLICE_COLUMNS = 128


@functools.cache
def device_info(device_id):
    """(compute capability as int e.g. 90, SM count, opt-in shared memory per block, shared
    memory per SM), memory in bytes."""
    import cupy

    dev = cupy.cuda.Device(device_id)
    attrs = dev.attributes
    return (int(dev.compute_capability), attrs["MultiProcessorCount"], attrs["MaxSharedMemoryPerBlockOptin"],
            attrs["MaxSharedMemoryPerMultiprocessor"])


def _kernel(device_id, variant, expr, smem_bytes=0):
    """The loaded CUDA function (cupy.cuda.function.Function) of one kernel instantiation on
    device `device_id` (CuPy loads a module into the current device's context, so it is made
    current here whatever the caller's current device is)."""
    key = (device_id, variant.name, expr, smem_bytes)
    fn = _functions.get(key)
    if fn is None:
        import cupy

        from cupy_backends.cuda.api import driver

        with cupy.cuda.Device(device_id):
            fn = _compile.get_module(device_id, variant).get_function(expr)
            if smem_bytes > 48 * 1024:
                driver.funcSetAttribute(fn.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes)
        _functions[key] = fn
    return fn


_functions = {}


def prepare_decode(device_id, dtype, head_dim, head_dim_v, cfg):
    """Loads the decode and combine functions of a problem and sets their launch attributes."""
    _kernel(device_id, _compile.decode_variant(dtype, head_dim, head_dim_v, cfg),
            _compile.decode_expression(dtype, head_dim, head_dim_v, cfg), cfg.smem_bytes)
    _kernel(device_id, _compile.combine_variant(dtype, head_dim_v), _compile.combine_expression(dtype, head_dim_v))


def launch_metadata(device_id, stream, params):
    """One warp builds the tile-scheduler metadata on the GPU."""
    fn = _kernel(device_id, _compile.metadata_variant(), _compile.METADATA_KERNEL)
    fn((1,), (32,), (params,), 0, stream)


def launch_decode(device_id, stream, variant, expr, cfg, params, num_m_blocks, h_kv, num_sm_parts):
    fn = _kernel(device_id, variant, expr, cfg.smem_bytes)
    fn((num_m_blocks, h_kv, num_sm_parts), (cfg.threads,), (params,), cfg.smem_bytes, stream)


def launch_combine(device_id, stream, variant, expr, params, batch, h_kv, m, head_dim_v):
    fn = _kernel(device_id, variant, expr)
    units = m * (head_dim_v // COMBINE_SLICE_COLUMNS)
    grid = (batch * ((units + COMBINE_WARPS - 1) // COMBINE_WARPS), h_kv)
    fn(grid, (32 * COMBINE_WARPS,), (params,), 0, stream)
