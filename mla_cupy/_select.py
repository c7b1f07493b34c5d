"""Kernel selection: the one place that maps (device, problem) to (kernel family, configuration).

A kernel family is a module beside its ``kernels/*.cuh`` (see ``_portable`` for the contract it
follows). ``FAMILIES`` lists them fastest first; "auto" takes the first whose ``supports()``
returns a configuration. ``MLA_CUPY_KERNEL`` (read once) or ``forced(kind)`` (this thread, for
a block) pick one family by name instead; a family that cannot run the problem then raises
UnsupportedDeviceError saying why. Adding a family = its .cuh, its module, one entry in
FAMILIES (its NAME being among KERNELS).

``get_mla_metadata``, ``flash_mla_with_kvcache``, ``warmup``, the benchmark and the tuning
script all ask here; nothing else knows a family's rules.
"""

import contextlib
import dataclasses
import functools
import threading

from . import _combine, _launch, _metadata, _portable, _sm90
from ._env import CONFIG, KERNEL_KINDS
from ._errors import UnsupportedDeviceError
from .scheduler import num_sm_parts

KERNELS = KERNEL_KINDS  # ("auto", "portable", "sm90")

# Families in the order "auto" tries them: fastest first. sm90 runs on compute capability 9.0
# only; every other GPU, and every problem sm90 does not cover, gets the portable kernel.
FAMILIES = (_sm90, _portable)

# What get_mla_metadata assumes of the decode calls to come (it sees neither dtype, head dims
# nor page size): DeepSeek V3's shapes.
METADATA_PROBLEM = dict(dtype="bfloat16", head_dim=576, head_dim_v=512, page_block_size=64)


@dataclasses.dataclass(frozen=True)
class Problem:
    """What selection looks at (the attribute names of ``_validate.DecodeProblem``)."""

    dtype: str
    head_dim: int
    head_dim_v: int
    m: int  # query rows per KV head, s_q * h_q // h_kv
    page_block_size: int


@dataclasses.dataclass(frozen=True)
class Choice:
    family: object  # the family's module
    config: object  # its configuration for the problem
    problem: Problem


class _Local(threading.local):
    kind = None  # the kind forced() sets on this thread (a class default: no lookup miss per call)


_local = _Local()


def kind():
    """The kernel kind in force on this thread: forced(), else MLA_CUPY_KERNEL ("auto" default)."""
    return _local.kind or CONFIG.kernel


@contextlib.contextmanager
def forced(kind_):
    """Within the block, this thread's calls use kernel kind `kind_` (one of KERNELS)."""
    if kind_ not in KERNELS:
        raise ValueError(f"kernel kind: expected one of {KERNELS}, got {kind_!r}")
    prev = _local.kind
    _local.kind = kind_
    try:
        yield
    finally:
        _local.kind = prev


def decode_choice(device_id, dtype, head_dim, head_dim_v, m, page_size):
    """Choice (``.family``, ``.config``, ``.problem``) for a decode call on device `device_id`.

    Raises UnsupportedDeviceError when no family (or not the forced one) can run it.
    """
    return _choose(device_id, Problem(dtype, head_dim, head_dim_v, m, page_size), kind())


@functools.cache
def _choose(device_id, problem, kind_):
    device = _launch.device_info(device_id)
    by_name = {f.NAME: f for f in FAMILIES}
    if kind_ == "auto":
        candidates = FAMILIES
    elif kind_ in by_name:
        candidates = (by_name[kind_],)
    else:
        raise UnsupportedDeviceError(f"kernel kind {kind_!r} (MLA_CUPY_KERNEL or forced()): that kernel family "
                                     "is not part of this version")
    for family in candidates:
        config = family.supports(device, problem)
        if config is not None:
            return Choice(family, config, problem)
    reasons = "; ".join(f"{f.NAME}: {f.why_not(device, problem)}" for f in candidates)
    raise UnsupportedDeviceError(
        f"device {device_id}: no kernel family of kind {kind_!r} runs {problem.dtype} head_dim "
        f"{problem.head_dim}/{problem.head_dim_v}, {problem.m} query rows per KV head, page {problem.page_block_size} "
        f"({reasons})")


def sm_parts(device_id, m, h_kv):
    """num_sm_parts of get_mla_metadata: the device's SMs times the CTAs per SM of the family
    that would run a METADATA_PROBLEM with m query rows per KV head."""
    choice = _choose(device_id, Problem(m=m, **METADATA_PROBLEM), kind())
    return num_sm_parts(_launch.device_info(device_id).sms * choice.config.ctas_per_sm, m, h_kv)


def warmup_rows():
    """Row counts (m) whose configurations cover every one the registered families pick."""
    return tuple(sorted({m for f in FAMILIES for m in f.WARMUP_ROWS}))


def all_variants():
    """Every module any supported GPU can need: scheduler, combines, every family's decodes."""
    out = {}
    for v in [*_metadata.all_variants(), *_combine.all_variants(), *(v for f in FAMILIES for v in f.all_variants())]:
        out.setdefault(v.name, v)
    return list(out.values())
