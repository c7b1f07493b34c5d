"""Kernel family "sm90": the Hopper split-KV decode of kernels/decode_sm90.cuh (wgmma, TMA,
a producer warp and two consumer warpgroups, one CTA of 64 query rows per SM; at most 16 query
rows take its transposed form), built for sm_90a only. It follows the family contract
described in ``_portable``; ``_select`` tries it before the portable family.

It runs bf16 and fp16 at head dims 576/512 and 512/512, with pages of 8, 16 or 32 tokens or
any multiple of 64 (the TMA box is min(page, 64) tokens of one page). Every other problem
falls back to the portable family by itself.
"""

import dataclasses
import functools

from . import _combine, _compile, _driver, _env, _launch, _params
from .support import DTYPES

NAME = "sm90"
FILES = _compile.COMMON_FILES + ("decode_sm90.cuh",)
ARCH = "sm_90a"
COMPUTE_CAPABILITY = 90

HEAD_DIMS = ((576, 512), (512, 512))
SMALL_PAGES = (8, 16, 32)  # a 64-token tile takes 64 / page TMA boxes per column chunk
TILE_TOKENS = 64
THREADS = 384  # producer warpgroup + two consumer warpgroups (DecodeTraits::THREADS)
M_TILE = 64  # packed query rows per CTA (DecodeTraits::BM)
# Problems of at most 16 query rows per KV head take the transposed form (16 query columns);
# more rows take the pair form (64-row tiles). One warmup problem per form. (A transposed form
# of 32 columns measured 6 % slower than the row form, the pair form's predecessor, at 32
# rows: both consumers compute the whole S^T, which at 32 columns is more matrix work than the
# padding it saves.)
TRANSPOSED_ROWS = (16,)
WARMUP_ROWS = (*TRANSPOSED_ROWS, 64)
PDL_DRIVER = 12030  # programmatic launches in captured CUDA graphs need a CUDA 12.3 driver



@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    page_box: int  # tokens per TMA box, min(page_block_size, 64)
    smem_bytes: int
    threads: int = THREADS
    ctas_per_sm: int = 1
    m_tile: int = M_TILE
    nq: int = 0  # query columns of the transposed form (16); 0: the pair form


def smem_bytes(head_dim, head_dim_v=512):
    """Dynamic shared memory of the kernel (mirrors DecodeTraits::SMEM_BYTES; asserted when it
    compiles): 1 KB of alignment slack, Q, two KV stages, P, row statistics, mbarriers."""
    chunks = head_dim // 64
    return 1024 + chunks * M_TILE * 128 + 2 * chunks * TILE_TOKENS * 128 + M_TILE * 128 + 2 * 2 * M_TILE * 4 \
        + (2 * chunks + 4) * 8


def page_box(page_block_size):
    if page_block_size % TILE_TOKENS == 0:
        return TILE_TOKENS
    return page_block_size if page_block_size in SMALL_PAGES else None


# ---- selection ----------------------------------------------------------------------------------

def supports(device, problem):
    """The configuration for `problem` on `device` (a _launch.DeviceInfo), or None."""
    if why_not(device, problem):
        return None
    nq = next((n for n in TRANSPOSED_ROWS if problem.m <= n), 0)
    return DecodeConfig(page_box(problem.page_block_size), smem_bytes(problem.head_dim, problem.head_dim_v), nq=nq)


def why_not(device, problem):
    """Why this family cannot run `problem` on `device`, in words ("" when it can)."""
    if device.cc != COMPUTE_CAPABILITY:
        return f"needs compute capability 9.0 (sm_90a), the device has {device.cc // 10}.{device.cc % 10}"
    if (problem.head_dim, problem.head_dim_v) not in HEAD_DIMS:
        return f"head_dim {problem.head_dim}/{problem.head_dim_v} is not one of {HEAD_DIMS}"
    if problem.dtype not in DTYPES:
        return f"dtype {problem.dtype} is not one of {DTYPES}"
    if page_box(problem.page_block_size) is None:
        return (f"page_block_size {problem.page_block_size} is neither a multiple of {TILE_TOKENS} nor one of "
                f"{SMALL_PAGES}")
    if device.smem_per_block < smem_bytes(problem.head_dim, problem.head_dim_v):
        return f"{device.smem_per_block} bytes of shared memory per block are fewer than {smem_bytes(problem.head_dim, problem.head_dim_v)}"
    return ""


# ---- variants -----------------------------------------------------------------------------------

def expression(dtype, head_dim, head_dim_v, box, nq=0):
    return f"mla::sm90::decode_sm90_kernel<{_compile.cpp_elem(dtype)}, {head_dim}, {head_dim_v}, {box}, {nq}>"


def variant(dtype, head_dim, head_dim_v, box, nq=0):
    """One module per kernel instantiation (each takes ~1 s to build), for sm_90a."""
    expr = expression(dtype, head_dim, head_dim_v, box, nq)
    traits = f"mla::sm90::DecodeTraits<{head_dim}, {head_dim_v}, {box}>"
    form = f"_t{nq}" if nq else ""
    return _compile.Variant(f"decode_sm90_{_compile.dtype_tag(dtype)}_d{head_dim}_dv{head_dim_v}_p{box}{form}", (expr,),
                            FILES, arch=ARCH,
                            checks=((f"{traits}::SMEM_BYTES", smem_bytes(head_dim, head_dim_v)),
                                    (f"{traits}::THREADS", THREADS), (f"{traits}::BM", M_TILE),
                                    (f"{traits}::BN", TILE_TOKENS)))


def variants(problem, config):
    """Every module a call of `problem` with `config` needs: the decode and its combine."""
    return [variant(problem.dtype, problem.head_dim, problem.head_dim_v, config.page_box, config.nq),
            _combine.variant(problem.dtype, problem.head_dim_v)]


def all_variants():
    return [variant(dt, d, dv, box, nq) for dt in DTYPES for d, dv in HEAD_DIMS for box in (TILE_TOKENS, *SMALL_PAGES)
            for nq in (0, *TRANSPOSED_ROWS)]


# ---- launch -------------------------------------------------------------------------------------

def _decode_function(device_id, problem, config):
    p = problem
    return _launch.function(device_id, variant(p.dtype, p.head_dim, p.head_dim_v, config.page_box, config.nq),
                            expression(p.dtype, p.head_dim, p.head_dim_v, config.page_box, config.nq),
                            config.smem_bytes)


def prepare(device_id, problem, config):
    """Loads (building if needed) the kernels of `problem` and sets their launch attributes."""
    _decode_function(device_id, problem, config)
    _launch.function(device_id, _combine.variant(problem.dtype, problem.head_dim_v),
                     _combine.expression(problem.dtype, problem.head_dim_v))


def _tma_strides(kv):
    """k_cache's byte strides for the tensor map: a dimension of extent 1 takes the dense
    stride (its own stride is never used, and may be anything the validators allowed)."""
    shape, strides = kv.shape, list(kv.strides)
    dense = kv.itemsize * shape[3]
    for i in (2, 1, 0):
        if shape[i] == 1:
            strides[i] = dense
        dense = strides[i] * shape[i]
    return tuple(strides)


@functools.cache
def programmatic_combine():
    """Whether the combine follows the decode as a programmatic dependent launch, which
    overlaps its launch and start with the decode's last CTAs (MLA_CUPY_PDL=0 turns it off)."""
    if not _env.CONFIG.pdl:
        return False
    import cupy

    return cupy.cuda.runtime.driverGetVersion() >= PDL_DRIVER


class DecodeLaunch:
    """Decode + combine of one call signature (see ``_portable.DecodeLaunch``); the TMA
    descriptor of each k_cache is encoded on its first call and kept by address (bounded)."""

    def __init__(self, device_id, arrays, problem, config):
        pb, kv = problem, arrays["k_cache"]
        if config.nq and pb.m > config.nq:  # the transposed form computes one block of nq rows
            raise RuntimeError(f"sm90: transposed form of {config.nq} rows chosen for {pb.m} query rows")
        params, out_strides, lse_strides = _params.decode_block(arrays, pb)
        row_blocks = -(-pb.m // config.m_tile)
        self.decode = _launch.Kernel(_decode_function(device_id, pb, config),
                                     (row_blocks, pb.h_kv, pb.num_sm_parts), (config.threads,),
                                     config.smem_bytes, params, extra=1)
        self._kv_shape, self._kv_strides = tuple(kv.shape), _tma_strides(kv)
        self._dtype, self._box, self._shared_tiles = pb.dtype, config.page_box, row_blocks > 1
        self._maps = {}  # k_cache address -> (host address, bytes) of its tensor map
        self.combine = _combine.CombineLaunch(device_id, pb, out_strides, lse_strides,
                                              programmatic=programmatic_combine())
        #: fp32 split workspace this launch needs: (rows, columns) of o_accum; lse_accum has rows.
        self.workspace = ((pb.batch + pb.num_sm_parts) * pb.h_kv * pb.m, pb.head_dim_v)

    def _kv_map(self, kv_ptr):
        entry = self._maps.get(kv_ptr)
        if entry is None:
            image = _driver.encode_kv_map(kv_ptr, self._kv_shape, self._kv_strides, self._dtype, self._box,
                                          self._shared_tiles)
            if len(self._maps) >= _MAX_MAPS:
                self._maps.clear()
            entry = self._maps[kv_ptr] = (image.ctypes.data, image)
        return entry

    def launch(self, stream, inputs, out, lse, o_accum, lse_accum):
        """Launch decode then combine on `stream` (arguments as in ``_portable.DecodeLaunch.launch``)."""
        self.decode(stream, (*inputs, out, lse, o_accum, lse_accum), (self._kv_map(inputs[1]),))
        self.combine(stream, inputs[5], o_accum, lse_accum, out, lse)

    def __call__(self, stream, arrays, out, lse, o_accum, lse_accum):
        """:meth:`launch` with a stream object (``.ptr``) and the CuPy arrays by argument name."""
        self.launch(getattr(stream, "ptr", stream), _params.input_pointers(arrays), out, lse, o_accum, lse_accum)


_MAX_MAPS = 1024  # tensor maps kept per launch plan (one per k_cache address: a layer's pool)
