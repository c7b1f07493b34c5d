"""The tile-scheduler kernel (kernels/scheduler.cuh) as a module of its own: its variant and
its launch. ``scheduler.py`` is its NumPy twin; ``_select.sm_parts`` decides how many parts."""

import functools

import numpy as np

from . import _compile, _launch, _params
from .support import SCHED_BLOCK_TOKENS, SCHED_FIXED_OVERHEAD_BLOCKS, SCHED_METADATA_SIZE, SCHED_PAYLOAD_STEP_SHIFT

FILES = _compile.COMMON_FILES + ("scheduler.cuh",)
KERNEL = "mla::metadata_kernel"
THREADS = 32  # one warp


@functools.cache
def variant():
    return _compile.Variant("metadata", (KERNEL,), FILES, checks=(
        ("mla::kMetadataThreads", THREADS), ("mla::kSchedPayloadStepShift", SCHED_PAYLOAD_STEP_SHIFT),
        *SCHEDULE_CHECKS))


# The schedule layout every reader and writer of tile_scheduler_metadata shares (params.cuh).
SCHEDULE_CHECKS = (("mla::kSchedBlockTokens", SCHED_BLOCK_TOKENS), ("mla::kSchedMetadataSize", SCHED_METADATA_SIZE))


def all_variants():
    return [variant()]


class MetadataLaunch:
    """The scheduler launch of one (device, batch, parts): its parameter block (seqlens, sched and
    num_splits written per launch) and the loaded kernel. Called inside the device's context."""

    def __init__(self, device_id, batch, parts):
        self.batch, self.parts = batch, parts
        fn = _functions.get(device_id)
        if fn is None:
            fn = _functions[device_id] = _launch.function(device_id, variant(), KERNEL)
        params = _params.Block(_params.METADATA_PARAMS, POINTERS, batch=batch, num_sm_parts=parts,
                               block_tokens=SCHED_BLOCK_TOKENS, fixed_overhead=SCHED_FIXED_OVERHEAD_BLOCKS)
        self.kernel = _launch.Kernel(fn, (1,), (THREADS,), 0, params)

    def __call__(self, stream, seqlens, sched, num_splits):
        """Launch on stream `stream` (an int address): fill sched [parts, 8] and num_splits
        [batch + 1] (int32 device pointers) from seqlens [batch] (a device pointer)."""
        self.kernel(stream, (seqlens, sched, num_splits))


POINTERS = ("seqlens", "sched", "num_splits")  # MetadataParams fields written per launch


def launcher(device_id, batch, parts):
    """The MetadataLaunch of (device, batch, parts), kept (bounded)."""
    key = (device_id, batch, parts)
    launch = _launches.get(key)
    if launch is None:
        if len(_launches) >= _MAX_LAUNCHES:
            _launches.clear()
        launch = _launches[key] = MetadataLaunch(device_id, batch, parts)
    return launch


def run(device_id, stream, seqlens, parts):
    """Allocates tile_scheduler_metadata [parts, 8] and num_splits [batch + 1] (int32, on the
    current device) and launches the scheduler on `stream` (``.ptr`` or an int) to fill them from
    `seqlens` (a CuPy array)."""
    import cupy

    batch = seqlens.shape[0]
    sched = cupy.empty((parts, SCHED_METADATA_SIZE), dtype=np.int32)
    num_splits = cupy.empty((batch + 1,), dtype=np.int32)
    launcher(device_id, batch, parts)(getattr(stream, "ptr", stream), seqlens.data.ptr, sched.data.ptr,
                                      num_splits.data.ptr)
    return sched, num_splits


_functions = {}  # device id -> the loaded scheduler kernel
_launches = {}  # (device id, batch, parts) -> MetadataLaunch
_MAX_LAUNCHES = 256
