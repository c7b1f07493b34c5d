"""Launch helpers shared by every kernel family: what a device offers, and loaded kernels.

Each family's own launch (grid, block, shared memory, stream) lives in its module
(``_portable``, ``_combine``, ``_metadata``); arguments arrive validated (``_validate``) and
packed (``_params``); modules come from ``_compile.get_module``. Every launch names its stream
explicitly, never relying on CuPy's current stream.
"""

import functools
from typing import NamedTuple

from . import _compile


class DeviceInfo(NamedTuple):
    """What kernel selection needs to know about a device."""

    cc: int  # compute capability as an int, e.g. 90
    sms: int  # streaming multiprocessors
    smem_per_block: int  # opt-in shared memory per block, bytes
    smem_per_sm: int  # shared memory per SM, bytes


@functools.cache
def device_info(device_id):
    """DeviceInfo of CUDA device `device_id`."""
    import cupy

    dev = cupy.cuda.Device(device_id)
    attrs = dev.attributes
    return DeviceInfo(int(dev.compute_capability), attrs["MultiProcessorCount"], attrs["MaxSharedMemoryPerBlockOptin"],
                      attrs["MaxSharedMemoryPerMultiprocessor"])


def function(device_id, variant, expr, smem_bytes=0):
    """The loaded CUDA function (cupy.cuda.function.Function, called as
    ``fn(grid, block, args, shared_bytes, stream)``) of one kernel instantiation of `variant` on
    device `device_id`, allowed `smem_bytes` of dynamic shared memory. Builds and loads the
    module on first use (CuPy loads a module into the current device's context, so the device
    is made current here whatever the caller's current device is)."""
    key = (device_id, variant, expr, smem_bytes)
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
