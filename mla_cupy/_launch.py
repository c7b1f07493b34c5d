"""Launch helpers shared by every kernel family: what a device offers, and loaded kernels.

Kernels of a launch plan go through :class:`Kernel`: the driver's ``cuLaunchKernelEx`` called
through ctypes with a launch configuration and argument array built once, only the stream and
the parameter block's pointers written per launch (CuPy's own kernel call where the driver has
no ``cuLaunchKernelEx``).

Each family's own launch (grid, block, shared memory, stream) lives in its module
(``_portable``, ``_combine``, ``_metadata``); arguments arrive validated (``_validate``) and
packed (``_params``); modules come from ``_compile.get_module``. Every launch names its stream
explicitly, never relying on CuPy's current stream.
"""

import ctypes
import functools
import threading
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


# ---- cuLaunchKernelEx ---------------------------------------------------------------------------

class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig (cuda.h): 56 bytes, the stream at offset 32."""

    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.c_void_p), ("num_attrs", ctypes.c_uint)]


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute (cuda.h): 72 bytes, the id at 0 and the value (a 64-byte union) at 8."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_uint64 * 8)]


_CUDA_ERROR_INVALID_CONTEXT = 201
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
# The special stream handles: 0 and cudaStreamLegacy (1), the legacy default stream, and
# cudaStreamPerThread (2). The driver refuses a programmatic launch on the legacy default stream
# (CUDA_ERROR_INVALID_VALUE); on these handles a programmatic kernel is launched as an ordinary one.
_SPECIAL_STREAMS = 2


@functools.cache
def _launch_kernel_ex():
    """``cuLaunchKernelEx`` of the driver library, or None (no library, or a driver before 12.0)."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return fn


class _StreamPtr:
    """A raw stream address where CuPy's kernel call wants a stream object."""

    __slots__ = ("ptr",)

    def __init__(self, ptr):
        self.ptr = ptr


class Kernel:
    """One kernel of a launch plan: a loaded function (`fn`, from :func:`function`), its grid,
    block and dynamic shared memory, and its parameter block (a ``_params.Block``), followed by
    `extra` by-value arguments whose host address is given per launch.

    ``kernel(stream_ptr, pointers, extra)`` writes `pointers` into the block and launches on
    stream `stream_ptr` (an int) on the current device, which must be `fn`'s. A lock makes the
    write and the launch one step: concurrent callers of one plan cannot mix their pointers.

    `programmatic`: launch with programmatic stream serialization (programmatic dependent
    launch, sm_90 and later): the kernel may start before the previous kernel on the stream has
    finished, and must wait for it in the kernel (``pdl_wait()`` in kernels/prelude.cuh). On the
    default streams (handles 0, 1, 2) it is launched as an ordinary kernel.
    """

    def __init__(self, fn, grid, block, shared_bytes, params, extra=0, programmatic=False):
        self.fn, self.params, self.extra = fn, params, extra
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.block = tuple(block) + (1,) * (3 - len(block))
        self.shared_bytes = shared_bytes
        self.config = LaunchConfig(self.grid, self.block, shared_bytes, None, None, 0)
        self.programmatic = programmatic
        if programmatic:
            self.attrs = (LaunchAttribute * 1)()
            self.attrs[0].id = _CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
            self.attrs[0].value[0] = 1  # programmaticStreamSerializationAllowed
            self.config.attrs, self.config.num_attrs = ctypes.addressof(self.attrs), 1
            self.plain_config = LaunchConfig(self.grid, self.block, shared_bytes, None, None, 0)
            self._plain_config_address = ctypes.addressof(self.plain_config)
        self.argv = (ctypes.c_void_p * (1 + extra))(params.address)
        self._config_address = ctypes.addressof(self.config)
        self._argv_address = ctypes.addressof(self.argv)
        self._fn_ptr = fn.ptr
        self._stream = 0
        self._lock = threading.Lock()
        self._driver = _launch_kernel_ex()

    def __call__(self, stream_ptr, pointers, extra=()):
        """`extra`: (host address, NumPy array) of each extra argument's bytes."""
        with self._lock:
            self.params.set(pointers)
            if self._driver is None:
                args = (self.params.value(), *(a.view(f"V{a.nbytes}")[0] for _, a in extra))
                self.fn(self.grid, self.block, args, self.shared_bytes, _StreamPtr(stream_ptr))
                return
            for i, (address, _) in enumerate(extra):
                self.argv[1 + i] = address
            if self.programmatic and stream_ptr <= _SPECIAL_STREAMS:
                self.plain_config.stream = stream_ptr
                config = self._plain_config_address
            else:
                if stream_ptr != self._stream:
                    self.config.stream = stream_ptr
                    self._stream = stream_ptr
                config = self._config_address
            rc = self._driver(config, self._fn_ptr, self._argv_address, None)
            if rc == _CUDA_ERROR_INVALID_CONTEXT:  # a thread whose device context is not current yet
                import cupy

                cupy.cuda.runtime.setDevice(cupy.cuda.runtime.getDevice())
                rc = self._driver(config, self._fn_ptr, self._argv_address, None)
        if rc:
            from cupy_backends.cuda.api import driver

            raise driver.CUDADriverError(rc)
