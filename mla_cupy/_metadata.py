"""The tile-scheduler kernel (kernels/scheduler.cuh) as a module of its own: its variant and
its launch. ``scheduler.py`` is its NumPy twin; ``_select.sm_parts`` decides how many parts."""

import functools

import numpy as np

from . import _compile, _launch, _params
from .support import SCHED_BLOCK_TOKENS, SCHED_FIXED_OVERHEAD_BLOCKS, SCHED_METADATA_SIZE

FILES = _compile.COMMON_FILES + ("scheduler.cuh",)
KERNEL = "mla::metadata_kernel"
THREADS = 32  # one warp


@functools.cache
def variant():
    return _compile.Variant("metadata", (KERNEL,), FILES, checks=(
        ("mla::kMetadataThreads", THREADS), *SCHEDULE_CHECKS))


# The schedule layout every reader and writer of tile_scheduler_metadata shares (params.cuh).
SCHEDULE_CHECKS = (("mla::kSchedBlockTokens", SCHED_BLOCK_TOKENS), ("mla::kSchedMetadataSize", SCHED_METADATA_SIZE))


def all_variants():
    return [variant()]


_TEMPLATE = _params.Template(_params.METADATA_PARAMS, block_tokens=SCHED_BLOCK_TOKENS,
                             fixed_overhead=SCHED_FIXED_OVERHEAD_BLOCKS)


def run(device_id, stream, seqlens, parts):
    """Allocates tile_scheduler_metadata [parts, 8] and num_splits [batch + 1] (int32, on the
    current device) and launches the scheduler on `stream` to fill them from `seqlens`."""
    import cupy

    batch = seqlens.shape[0]
    sched = cupy.empty((parts, SCHED_METADATA_SIZE), dtype=np.int32)
    num_splits = cupy.empty((batch + 1,), dtype=np.int32)
    params = _TEMPLATE.pack(seqlens=seqlens.data.ptr, sched=sched.data.ptr, num_splits=num_splits.data.ptr,
                            batch=batch, num_sm_parts=parts)
    fn = _functions.get(device_id)
    if fn is None:
        fn = _functions[device_id] = _launch.function(device_id, variant(), KERNEL)
    fn((1,), (THREADS,), (params,), 0, stream)
    return sched, num_splits


_functions = {}  # device id -> the loaded scheduler kernel
