"""Kernel family "portable": the split-KV decode of kernels/decode_sm80.cuh (mma.sync, cp.async),
for every GPU of compute capability 8.0 and newer. Everything about it lives here: its
configuration (tile rows, stages, warp layout, CTAs per SM), its variants, its parameter block
and its launch. ``_select`` asks ``supports()`` whether it runs a problem.

A family module defines: ``NAME``; ``WARMUP_ROWS``; a frozen config dataclass with a
``ctas_per_sm`` field; ``supports(device, problem) -> config | None`` and
``why_not(device, problem) -> str``; ``variants(problem, config)`` (every module one call
needs) and ``all_variants()`` (every module any supported GPU can need, for the compile lane);
``prepare(device_id, problem, config)`` (load those modules, set launch attributes); and
``DecodeLaunch(device_id, arrays, problem, config)`` with ``workspace``,
``launch(stream_ptr, input_pointers, out, lse, o_accum, lse_accum)`` (the per-call path: ints
only, see ``_params.INPUTS``) and ``__call__(stream, arrays, out, lse, o_accum, lse_accum)``.
"""

import dataclasses

from . import _combine, _compile, _launch, _metadata, _params
from .support import DTYPES, HEAD_DIMS, MIN_COMPUTE_CAPABILITY

NAME = "portable"
FILES = _compile.COMMON_FILES + ("decode_sm80.cuh",)

# Decode kernel tile constants (mirror kernels/decode_sm80.cuh DecodeTraits).
MAX_STAGES = 4
M_TILES = (16, 32, 64)
WARMUP_ROWS = M_TILES  # one problem per tile size: every configuration this family picks
# Shared memory (opt-in per block, per SM) of the GPU classes the compile lane covers, bytes:
# sm_86/89-class, sm_80/87, sm_90.
SMEM_CLASSES = ((101376, 102400), (166912, 167936), (232448, 233472))
SMEM_RESERVED_PER_CTA = 1024  # the hardware keeps 1 KB of every CTA's shared memory



@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    m_tile: int
    stages: int
    threads: int
    smem_bytes: int
    ctas_per_sm: int = 1
    warps_n: int = 4  # warps sharing each row group (DecodeTraits::WN)
    m_tiles_per_warp: int = 1  # 16-row mma tiles each warp owns (DecodeTraits::MT)
    kv_tile: int = 32  # KV tokens per pipeline stage (DecodeTraits::BN)


def decode_layout(m_tile):
    """(warps_n, m_tiles_per_warp, kv_tile) of a tile. 16-row tiles: four 16-row warps over
    32-token stages. 32- and 64-row tiles: 32-row warps (two m16 tiles, so each K/V fragment
    loaded from shared memory feeds two mma) in groups of four, over 32- or 64-token stages."""
    return {16: (4, 1, 32), 32: (4, 2, 32), 64: (4, 2, 64)}[m_tile]


def decode_smem_bytes(head_dim, m_tile, stages, layout=None):
    wn, _, bn = decode_layout(m_tile) if layout is None else layout
    q = m_tile * head_dim * 2
    kv = bn * head_dim * 2
    p = m_tile * (bn + 8) * 2
    stats = 2 * wn * m_tile * 4
    return q + stages * kv + p + stats


def ctas_per_sm(m, smem_per_sm):
    """Decode CTAs resident per SM: two CTAs of the 16- or 32-row tile where two fit (small m is
    memory-bound and a second CTA hides the first one's barriers and latencies), else one.

    Decided from m alone (sized for the largest head_dim), so ``get_mla_metadata``, which does
    not see head_dim, and the decode call agree on it.
    """
    d_max = max(d for d, _ in HEAD_DIMS)
    if m <= M_TILES[1]:
        tile = next(t for t in M_TILES if m <= t)
        if 2 * (decode_smem_bytes(d_max, tile, 2) + SMEM_RESERVED_PER_CTA) <= smem_per_sm:
            return 2
    return 1


def decode_config(head_dim, m, smem_per_block, smem_per_sm=None):
    """Tile and pipeline depth for m packed query rows on a device with this shared memory.

    The smallest tile covering m (16, 32 or 64 rows; larger m uses several 64-row CTAs), then
    as many KV stages as fit the per-CTA budget (at most MAX_STAGES; with two CTAs per SM, half
    the SM's memory); a tile that fits fewer than two stages falls back to the next smaller one.
    Returns None when even 16 rows and two stages do not fit.
    """
    occ = 1 if smem_per_sm is None else ctas_per_sm(m, smem_per_sm)
    budget = smem_per_block if occ == 1 else min(smem_per_block, smem_per_sm // occ - SMEM_RESERVED_PER_CTA)
    m_tile = next((t for t in M_TILES if m <= t), M_TILES[-1])
    while True:
        wn, mt, bn = decode_layout(m_tile)
        fixed = decode_smem_bytes(head_dim, m_tile, 0)
        stages = min(MAX_STAGES, (budget - fixed) // (bn * head_dim * 2))
        if stages >= 2:
            threads = 32 * (m_tile // (16 * mt)) * wn
            return DecodeConfig(m_tile, stages, threads, decode_smem_bytes(head_dim, m_tile, stages), occ, wn, mt, bn)
        if m_tile == M_TILES[0]:
            return None
        m_tile = M_TILES[M_TILES.index(m_tile) - 1]


# ---- selection ----------------------------------------------------------------------------------

def _min_cc():
    return MIN_COMPUTE_CAPABILITY[0] * 10 + MIN_COMPUTE_CAPABILITY[1]


def supports(device, problem):
    """The configuration for `problem` on `device` (a _launch.DeviceInfo), or None."""
    if device.cc < _min_cc():
        return None
    return decode_config(problem.head_dim, problem.m, device.smem_per_block, device.smem_per_sm)


def why_not(device, problem):
    """Why ``supports(device, problem)`` is None, in words."""
    if device.cc < _min_cc():
        return (f"compute capability {device.cc // 10}.{device.cc % 10} is older than "
                f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]}")
    return (f"{device.smem_per_block} bytes of shared memory per block are too few for the decode kernel "
            f"at head_dim {problem.head_dim}")


# ---- variants -----------------------------------------------------------------------------------

def expression(dtype, head_dim, head_dim_v, cfg):
    return (f"mla::decode_kernel<{head_dim}, {head_dim_v}, {cfg.m_tile}, {cfg.stages}, {cfg.warps_n}, "
            f"{cfg.m_tiles_per_warp}, {cfg.kv_tile}, {_compile.cpp_elem(dtype)}>")


def variant(dtype, head_dim, head_dim_v, cfg):
    """The decode module of one configuration (portable: built for the device's own arch). The
    compile checks that the kernel's traits agree with the shared memory and threads the launch
    uses."""
    traits = (f"mla::DecodeTraits<{head_dim}, {head_dim_v}, {cfg.m_tile}, {cfg.stages}, {cfg.warps_n}, "
              f"{cfg.m_tiles_per_warp}, {cfg.kv_tile}>")
    return _compile.Variant(
        f"decode_{_compile.dtype_tag(dtype)}_d{head_dim}_dv{head_dim_v}_m{cfg.m_tile}_s{cfg.stages}"
        f"_w{cfg.warps_n}_t{cfg.m_tiles_per_warp}_n{cfg.kv_tile}",
        (expression(dtype, head_dim, head_dim_v, cfg),),
        FILES,
        checks=((f"{traits}::SMEM_BYTES", cfg.smem_bytes), (f"{traits}::NTHREADS", cfg.threads),
                *_metadata.SCHEDULE_CHECKS),
    )


def variants(problem, config):
    """Every module a call of `problem` with `config` needs: the decode and its combine."""
    return [variant(problem.dtype, problem.head_dim, problem.head_dim_v, config),
            _combine.variant(problem.dtype, problem.head_dim_v)]


def all_variants():
    """Every decode module a supported GPU can need (each shared-memory class, each tile)."""
    out = {}
    for dtype in DTYPES:
        for d, dv in HEAD_DIMS:
            for smem_block, smem_sm in SMEM_CLASSES:
                for m in M_TILES:
                    cfg = decode_config(d, m, smem_block, smem_sm)
                    if cfg is not None:
                        v = variant(dtype, d, dv, cfg)
                        out[v.name] = v
    return list(out.values())


# ---- launch -------------------------------------------------------------------------------------

def _decode_function(device_id, problem, config):
    p = problem
    return _launch.function(device_id, variant(p.dtype, p.head_dim, p.head_dim_v, config),
                            expression(p.dtype, p.head_dim, p.head_dim_v, config), config.smem_bytes)


def prepare(device_id, problem, config):
    """Loads (building if needed) the kernels of `problem` and sets their launch attributes."""
    _decode_function(device_id, problem, config)
    _launch.function(device_id, _combine.variant(problem.dtype, problem.head_dim_v),
                     _combine.expression(problem.dtype, problem.head_dim_v))


class DecodeLaunch:
    """Decode + combine of one call signature: the fixed fields of both parameter blocks, the
    grid and the loaded kernels. `arrays` are the call's (CuPy) arrays by argument name, `problem`
    the validated ``_validate.DecodeProblem``; out / lse strides are those of ``arrays["out"]`` /
    ``arrays["lse"]``, or C-contiguous when they are None."""

    def __init__(self, device_id, arrays, problem, config):
        pb = problem
        params, out_strides, lse_strides = _params.decode_block(arrays, pb)
        self.decode = _launch.Kernel(_decode_function(device_id, pb, config),
                                     (-(-pb.m // config.m_tile), pb.h_kv, pb.num_sm_parts), (config.threads,),
                                     config.smem_bytes, params)
        self.combine = _combine.CombineLaunch(device_id, pb, out_strides, lse_strides)
        #: fp32 split workspace this launch needs: (rows, columns) of o_accum; lse_accum has rows.
        self.workspace = ((pb.batch + pb.num_sm_parts) * pb.h_kv * pb.m, pb.head_dim_v)

    def launch(self, stream, inputs, out, lse, o_accum, lse_accum):
        """Launch decode then combine on stream `stream` (an int address) of the current device.
        `inputs` are the device pointers of (q, k_cache, block_table, cache_seqlens,
        tile_scheduler_metadata, num_splits); out, lse, o_accum, lse_accum device pointers."""
        self.decode(stream, (*inputs, out, lse, o_accum, lse_accum))
        self.combine(stream, inputs[5], o_accum, lse_accum, out, lse)

    def __call__(self, stream, arrays, out, lse, o_accum, lse_accum):
        """:meth:`launch` with a stream object (``.ptr``) and the CuPy arrays by argument name."""
        self.launch(getattr(stream, "ptr", stream), _params.input_pointers(arrays), out, lse, o_accum, lse_accum)
