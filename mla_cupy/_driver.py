"""The few CUDA driver calls CuPy does not expose, through ctypes (no build step).

``encode_kv_map`` builds the TMA descriptor (``CUtensorMap``, 128 bytes) of a paged KV cache
for the sm90 decode kernel: one 4-D tiled map over the whole pool
``[num_blocks, page_block_size, h_kv, head_dim]`` whose box is 64 columns x ``page_box``
tokens of one head and one page, 128-byte swizzled, so the page id picked from the block table
is simply the outermost coordinate. Encoding costs ~10 µs; each sm90 launch plan keeps the
maps of the k_cache addresses it has seen (``_sm90.DecodeLaunch``).
"""

import contextlib
import ctypes
import functools

import numpy as np

from ._errors import UnsupportedDeviceError

# CUtensorMapDataType, CUtensorMapSwizzle, CUtensorMapL2promotion (cuda.h)
_DATA_TYPES = {"float16": 6, "bfloat16": 9}
_SWIZZLE_128B = 3
_L2_PROMOTION_128B = 2
_L2_PROMOTION_256B = 3
_INTERLEAVE_NONE = 0
_OOB_FILL_NONE = 0

TMA_BOX_COLUMNS = 64  # 64 16-bit elements = one 128-byte swizzle row
_CAPTURE_MODE_RELAXED = 2  # CUstreamCaptureMode


@functools.cache
def _libcuda():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise UnsupportedDeviceError(f"the CUDA driver library (libcuda.so.1) could not be loaded: {exc}") from exc
    fn = lib.cuTensorMapEncodeTiled
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                   ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


def encode_kv_map(ptr, shape, strides, dtype_name, page_box, shared_tiles=True):
    """The CUtensorMap of k_cache: 128 bytes in a NumPy uint8 array (a kernel's by-value argument).

    shape = (num_blocks, page_block_size, h_kv, head_dim) and strides in bytes, as CuPy gives
    them; the last dimension is contiguous and every other stride a multiple of 16 bytes
    (checked by the validators before this is reached).

    `shared_tiles`: whether more than one CTA reads each KV tile (more than one block of query
    rows per kv head). L2 fetches are then promoted to 256 bytes, else to 128 (one box row).
    Measured on the H200 at b128: 128 bytes cut the L2 read sectors by 13 % and the time by
    0.3-0.8 % where one CTA reads a tile, and cost 0.6-0.8 % where two do.
    """
    num_blocks, page, h_kv, d = shape
    dims = (ctypes.c_uint64 * 4)(d, h_kv, page, num_blocks)
    gstrides = (ctypes.c_uint64 * 3)(strides[2], strides[1], strides[0])
    box = (ctypes.c_uint32 * 4)(TMA_BOX_COLUMNS, 1, page_box, 1)
    elem = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    buf = np.zeros(128, dtype=np.uint8)
    rc = _libcuda().cuTensorMapEncodeTiled(
        buf.ctypes.data, _DATA_TYPES[dtype_name], 4, ctypes.c_void_p(ptr), dims, gstrides, box, elem,
        _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B if shared_tiles else _L2_PROMOTION_128B,
        _OOB_FILL_NONE)
    if rc != 0:
        raise UnsupportedDeviceError(
            f"k_cache: cuTensorMapEncodeTiled failed (CUresult {rc}) for shape {shape}, strides {strides}")
    return buf


@contextlib.contextmanager
def relaxed_capture_mode():
    """This thread in the relaxed stream-capture mode for the duration of the block: memory may
    then be allocated (``cudaMalloc``) while a stream captures a CUDA graph, which the global
    mode (torch's and CuPy's default for a capture) forbids."""
    exchange = _libcuda().cuThreadExchangeStreamCaptureMode
    mode = ctypes.c_int(_CAPTURE_MODE_RELAXED)
    status = exchange(ctypes.byref(mode))
    if status:
        raise RuntimeError(f"cuThreadExchangeStreamCaptureMode failed (CUresult {status})")
    try:
        yield
    finally:
        exchange(ctypes.byref(mode))  # the mode this thread had before
