"""Helpers for testing code that calls mla_cupy: input builders and the numerical contract.

:func:`make_decode_inputs` builds decode inputs the way FlashMLA's own tests do (random data,
a shuffled page pool, NaN in every slot that must never be read, a sentinel in every block
table entry that must never be read). :func:`compare_mla` and :func:`assert_mla_close` check
a result against :func:`mla_cupy.reference.flash_mla_with_kvcache_reference` with the
tolerances of the numerical contract.

Everything here works on NumPy host arrays; results given as CuPy arrays are copied to the
host. CuPy is imported only by :func:`gpu_status`, which says whether a GPU mla_cupy supports is
visible, and if not, why (the examples and mla_cupy's own test lanes use it).
"""

import concurrent.futures
import dataclasses
import os

import ml_dtypes
import numpy as np

from ._errors import no_gpu_reason
from .reference import _host
from .support import DTYPES, HEAD_DIMS, MAX_PAGE_BLOCK_SIZE, MIN_COMPUTE_CAPABILITY, MIN_PAGE_BLOCK_SIZE

__all__ = [
    "BLOCK_TABLE_SENTINEL",
    "CompareReport",
    "DecodeInputs",
    "Mismatch",
    "assert_mla_close",
    "compare_mla",
    "gpu_status",
    "make_decode_inputs",
]

# Written into block-table entries past a sequence's last page (FlashMLA's tests use the same
# value): far outside any page pool, so reading one is an out-of-bounds access.
BLOCK_TABLE_SENTINEL = 2147480000

# Numerical contract (data of standard deviation 0.1; absolute terms widen with std, see
# compare_mla). Output: FlashMLA's tolerances for bf16 results.
OUT_ATOL = 8e-4
OUT_RTOL = 2.01 / 128
OUT_COS_DIFF = 5e-6
# LSE: FlashMLA's own tolerance is 1e-6 absolute, but measured against a float64 reference
# FlashMLA's kernel itself meets 1e-5, not 1e-6; a bound the reference implementation fails
# would test nothing, so the float64 comparison uses 1e-5. Beside the relative term 8.01/65536
# (about 1.2e-4) the absolute term decides only where |lse| < 0.08.
LSE_ATOL = 1e-5
LSE_RTOL = 8.01 / 65536
_REFERENCE_STD = 0.1

_NUMPY_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


@dataclasses.dataclass(frozen=True)
class DecodeInputs:
    """Host inputs of one ``flash_mla_with_kvcache`` call, as built by :func:`make_decode_inputs`.

    Attributes
    ----------
    q : numpy.ndarray, shape (b, s_q, h_q, d)
    k_cache : numpy.ndarray, shape (num_blocks, page_block_size, h_kv, d)
        NaN in every slot past a sequence's end and in every block no sequence uses.
    block_table : numpy.ndarray of int32, shape (b, max_blocks_per_seq)
        ``BLOCK_TABLE_SENTINEL`` past each sequence's last page.
    cache_seqlens : numpy.ndarray of int32, shape (b,)
    head_dim_v : int
    std : float
        Standard deviation of the random values (pass it on to :func:`compare_mla`).
    seed : int
        Seed of the generator that drew everything; the same seed rebuilds the same inputs.
    """

    q: np.ndarray
    k_cache: np.ndarray
    block_table: np.ndarray
    cache_seqlens: np.ndarray
    head_dim_v: int
    std: float
    seed: int

    @property
    def page_block_size(self):
        """Tokens per page of ``k_cache``."""
        return self.k_cache.shape[1]


def _check_int(value, name, low):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _dtype_name(dtype):
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            raise TypeError(f"dtype must be one of {DTYPES}, got {dtype!r}") from None
    if name not in DTYPES:
        raise TypeError(f"dtype must be one of {DTYPES}, got {name!r}")
    return name


def _draw_seqlens(rng, batch, seqlens, mean_seqlen, varlen):
    if seqlens is None:
        mean = _check_int(mean_seqlen, "mean_seqlen", 0)
        if varlen:
            drawn = rng.normal(mean, mean / 4, size=batch)
            return np.maximum(np.round(drawn), 1).astype(np.int64)
        return np.full(batch, mean, dtype=np.int64)
    if isinstance(seqlens, (int, np.integer)) and not isinstance(seqlens, (bool, np.bool_)):
        return np.full(batch, _check_int(seqlens, "seqlens", 0), dtype=np.int64)
    values = np.asarray(seqlens)
    if values.dtype.kind not in "iu":
        raise TypeError(f"seqlens must be an int or a sequence of ints, got dtype {values.dtype}")
    if values.shape != (batch,):
        raise ValueError(f"seqlens must have {batch} entries (batch), got shape {values.shape}")
    if (values < 0).any():
        raise ValueError(f"seqlens must be >= 0, got minimum {int(values.min())}")
    return values.astype(np.int64)


def _fill_normal(rng, target, std):
    """Fill ``target`` with ``N(0, std)`` values, drawn in chunks on several threads.

    Each chunk has its own generator seeded from one draw of ``rng`` and the chunk's index,
    so the values depend only on ``rng``'s state, not on the number of threads.
    """
    flat = target.reshape(-1)
    key = int(rng.integers(1 << 62))
    step = 1 << 22
    starts = range(0, flat.size, step)

    def fill(chunk):
        start = starts[chunk]
        stop = min(flat.size, start + step)
        values = np.random.default_rng([key, chunk]).standard_normal(stop - start,
                                                                     dtype=np.float32)
        flat[start:stop] = values * np.float32(std)

    if len(starts) <= 1:
        for chunk in range(len(starts)):
            fill(chunk)
        return
    with concurrent.futures.ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
        list(pool.map(fill, range(len(starts))))


def make_decode_inputs(batch, s_q, h_q, h_kv=1, head_dim=576, head_dim_v=512,
                       page_block_size=64, seqlens=None, mean_seqlen=4096, varlen=False,
                       dtype="bfloat16", std=0.1, seed=None, extra_blocks=8):
    """Random decode inputs over a shuffled, NaN-poisoned paged KV cache.

    Parameters
    ----------
    batch, s_q, h_q : int
        Requests, query tokens per request and query heads (all ``>= 1``).
    h_kv : int, optional
        KV heads; ``h_q`` must be a multiple of it.
    head_dim, head_dim_v : int, optional
        Query/key width and value width; a pair of ``mla_cupy.support.HEAD_DIMS``.
    page_block_size : int, optional
        Tokens per page, within the supported page-size range.
    seqlens : int or sequence of int, optional
        Tokens of every request (an int: all the same). Default: drawn from
        ``mean_seqlen`` and ``varlen``.
    mean_seqlen : int, optional
        Length of every request, or the mean when ``varlen``; used only without ``seqlens``.
    varlen : bool, optional
        Draw lengths from ``N(mean_seqlen, mean_seqlen / 4)``, rounded and clipped to ``>= 1``.
    dtype : str or dtype, optional
        ``"bfloat16"`` or ``"float16"``.
    std : float, optional
        Standard deviation of the values of ``q`` and ``k_cache`` (``> 0``).
    seed : int, optional
        Seed of the random generator; a fresh one is drawn (and recorded) when omitted.
    extra_blocks : int, optional
        Blocks in the pool that no request uses (all NaN).

    Returns
    -------
    DecodeInputs
        Host arrays. Every used page sits at a random place of the pool; every KV slot past a
        request's end and every unused block is NaN; every block-table entry past a request's
        last page is ``BLOCK_TABLE_SENTINEL``, and each row has at least one such entry.

    Raises
    ------
    TypeError
        If an integer argument is not an int or ``dtype`` is unsupported.
    ValueError
        If a value is out of range or the shapes are inconsistent.
    """
    batch = _check_int(batch, "batch", 1)
    s_q = _check_int(s_q, "s_q", 1)
    h_q = _check_int(h_q, "h_q", 1)
    h_kv = _check_int(h_kv, "h_kv", 1)
    if h_q % h_kv:
        raise ValueError(f"h_q ({h_q}) must be a multiple of h_kv ({h_kv})")
    if (head_dim, head_dim_v) not in HEAD_DIMS:
        raise ValueError(f"(head_dim, head_dim_v) must be one of {HEAD_DIMS}, "
                         f"got ({head_dim}, {head_dim_v})")
    page = _check_int(page_block_size, "page_block_size", MIN_PAGE_BLOCK_SIZE)
    if page > MAX_PAGE_BLOCK_SIZE:
        raise ValueError(f"page_block_size must be <= {MAX_PAGE_BLOCK_SIZE}, got {page}")
    extra_blocks = _check_int(extra_blocks, "extra_blocks", 0)
    name = _dtype_name(dtype)
    std = float(std)
    if not std > 0 or not np.isfinite(std):
        raise ValueError(f"std must be a positive finite number, got {std}")
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (1 << 63))
    seed = _check_int(seed, "seed", 0)
    rng = np.random.default_rng(seed)

    lengths = _draw_seqlens(rng, batch, seqlens, mean_seqlen, varlen)
    if lengths.max() > np.iinfo(np.int32).max:
        raise ValueError(f"seqlens must fit in int32, got maximum {int(lengths.max())}")
    pages = -(-lengths // page)
    used = int(pages.sum())
    num_blocks = used + extra_blocks
    if num_blocks == 0:
        num_blocks = 1  # keep the pool non-empty even when every request is empty
    # One column more than the longest request needs, so every row holds a sentinel.
    block_table = np.full((batch, int(pages.max()) + 1), BLOCK_TABLE_SENTINEL, dtype=np.int32)
    physical = rng.permutation(num_blocks).astype(np.int32)
    start = 0
    for i in range(batch):
        block_table[i, : pages[i]] = physical[start: start + pages[i]]
        start += int(pages[i])

    np_dtype = _NUMPY_DTYPES[name]
    q = np.empty((batch, s_q, h_q, head_dim), dtype=np_dtype)
    _fill_normal(rng, q, std)
    k_cache = np.empty((num_blocks, page, h_kv, head_dim), dtype=np_dtype)
    _fill_normal(rng, k_cache, std)
    # Poison what must never be read: unused blocks, and the tail of each last page.
    k_cache[physical[used:]] = np.nan
    for i in range(batch):
        tail = int(lengths[i]) % page
        if tail:
            k_cache[block_table[i, pages[i] - 1], tail:] = np.nan

    return DecodeInputs(
        q=q, k_cache=k_cache, block_table=block_table,
        cache_seqlens=lengths.astype(np.int32), head_dim_v=int(head_dim_v), std=std, seed=seed)


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """The worst element of one compared tensor.

    Attributes
    ----------
    name : str
        ``"out"`` or ``"lse"``.
    index : tuple of int
        Position in the tensor.
    actual, expected : float
        Tested and reference values there.
    error : float
        ``|actual - expected|`` (``nan`` where the mismatch is a NaN/inf pattern).
    allowed : float
        Tolerance at that position (``atol + rtol * |expected|``).
    """

    name: str
    index: tuple
    actual: float
    expected: float
    error: float
    allowed: float

    def __str__(self):
        return (f"{self.name}[{', '.join(map(str, self.index))}] = {self.actual!r}, "
                f"reference {self.expected!r}, |error| {self.error:.3e} "
                f"(allowed {self.allowed:.3e})")


@dataclasses.dataclass(frozen=True)
class CompareReport:
    """Outcome of :func:`compare_mla`.

    Attributes
    ----------
    passed : bool
        Every check held.
    failures : tuple of str
        One line per failed check, in the order they were made.
    out_max_abs_error, lse_max_abs_error : float
        Largest absolute error over the finite reference values.
    out_cos_diff : float
        ``1 - 2 sum(a r) / (sum(a^2) + sum(r^2))`` over the whole output.
    out_worst, lse_worst : Mismatch or None
        The element with the largest error relative to its tolerance, or the first element
        of a NaN/inf mismatch; None for an empty tensor.
    """

    passed: bool
    failures: tuple
    out_max_abs_error: float
    out_cos_diff: float
    lse_max_abs_error: float
    out_worst: Mismatch | None
    lse_worst: Mismatch | None

    def __bool__(self):
        return self.passed

    def __str__(self):
        head = "MLA results match the reference" if self.passed else \
            "MLA results differ from the reference: " + "; ".join(self.failures)
        lines = [head,
                 f"  out: max |error| {self.out_max_abs_error:.3e}, "
                 f"cosine difference {self.out_cos_diff:.3e}",
                 f"  lse: max |error| {self.lse_max_abs_error:.3e}"]
        for worst in (self.out_worst, self.lse_worst):
            if worst is not None:
                lines.append(f"  worst {worst}")
        return "\n".join(lines)


def _as_float64(x, name):
    x = _host(x)
    if x.dtype.kind not in "fc" and x.dtype.name not in DTYPES:
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x.astype(np.float64)


def _cos_diff(a, r):
    """``1 - 2 sum(a r) / (sum(a^2) + sum(r^2))``; 0 when both are all zero."""
    denom = float(np.sum(a * a) + np.sum(r * r))
    if denom == 0.0:
        return 0.0
    return 1.0 - 2.0 * float(np.sum(a * r)) / denom


def _worst(name, a, r, atol, rtol):
    """Largest error relative to its tolerance; returns (Mismatch, max |error|, ok)."""
    if a.size == 0:
        return None, 0.0, True
    err = np.abs(a - r)
    allowed = atol + rtol * np.abs(r)
    flat = int(np.argmax(err / allowed))
    index = tuple(int(k) for k in np.unravel_index(flat, a.shape))
    worst = Mismatch(name, index, float(a[index]), float(r[index]), float(err[index]),
                     float(allowed[index]))
    return worst, float(err.max()), bool((err <= allowed).all())


def _pattern_mismatch(name, a, r, bad):
    index = tuple(int(k) for k in np.argwhere(bad)[0])
    return Mismatch(name, index, float(a[index]), float(r[index]), float("nan"), 0.0)


def compare_mla(out, lse, out_ref, lse_ref, std=0.1):
    """Check ``(out, lse)`` against the float64 reference with the numerical contract.

    First the NaN/inf patterns: ``out`` must be finite wherever the reference is, and ``lse``
    must be ``+inf`` exactly where the reference is (a query that sees no key) and NaN nowhere.
    Then, on the finite values, ``|a - r| <= atol + rtol * |r|`` element-wise, with

    * out: ``atol = 8e-4 * (std / 0.1)``, ``rtol = 2.01 / 128``, and a cosine difference
      ``1 - 2 sum(a r) / (sum(a^2) + sum(r^2)) <= 5e-6`` over the whole tensor;
    * lse: ``atol = 1e-5 * (std / 0.1) ** 2``, ``rtol = 8.01 / 65536``.

    The absolute terms grow with the data: P is rounded to 16 bits before P.V, so the output
    error scales with |V|, and the lse error with |q.k|.

    Parameters
    ----------
    out : array_like, shape (b, s_q, h_q, dv)
        Tested output (NumPy, or CuPy: copied to the host), any float dtype.
    lse : array_like, shape (b, h_q, s_q)
        Tested log-sum-exp.
    out_ref, lse_ref : array_like
        Reference values of the same shapes.
    std : float, optional
        Standard deviation of the input data (0.1 in FlashMLA's tests).

    Returns
    -------
    CompareReport
        Pass/fail, the failed checks, the largest errors and the worst positions. It is
        truthy exactly when every check passed.

    Raises
    ------
    TypeError
        If an array is not floating point.
    ValueError
        If ``std`` is not positive and finite.
    """
    std = float(std)
    if not std > 0 or not np.isfinite(std):
        raise ValueError(f"std must be a positive finite number, got {std}")
    a_out, r_out = _as_float64(out, "out"), _as_float64(out_ref, "out_ref")
    a_lse, r_lse = _as_float64(lse, "lse"), _as_float64(lse_ref, "lse_ref")
    scale = std / _REFERENCE_STD
    failures = []
    if a_out.shape != r_out.shape or a_lse.shape != r_lse.shape:
        failures.append(f"shapes differ: out {a_out.shape} vs {r_out.shape}, "
                        f"lse {a_lse.shape} vs {r_lse.shape}")
        return CompareReport(False, tuple(failures), float("nan"), float("nan"),
                             float("nan"), None, None)

    # out: the reference is finite everywhere (0 for a query with no key); so must out be.
    out_worst = lse_worst = None
    out_bad = ~np.isfinite(a_out) | ~np.isfinite(r_out)
    if out_bad.any():
        out_worst = _pattern_mismatch("out", a_out, r_out, out_bad)
        failures.append(f"out has {int(out_bad.sum())} non-finite values "
                        f"(NaN {int(np.isnan(a_out).sum())})")
    # lse: +inf exactly where the reference has +inf, NaN nowhere.
    lse_bad = (np.isnan(a_lse) | np.isnan(r_lse)
               | (np.isinf(a_lse) != np.isinf(r_lse))
               | (np.isinf(r_lse) & (a_lse != r_lse)))
    if lse_bad.any():
        lse_worst = _pattern_mismatch("lse", a_lse, r_lse, lse_bad)
        failures.append(f"lse NaN/inf pattern differs at {int(lse_bad.sum())} positions")

    out_max = out_cos = lse_max = float("nan")
    if not out_bad.any():
        out_worst, out_max, ok = _worst("out", a_out, r_out, OUT_ATOL * scale, OUT_RTOL)
        if not ok:
            failures.append("out exceeds |a - r| <= atol + rtol * |r|")
        out_cos = _cos_diff(a_out, r_out)
        if not out_cos <= OUT_COS_DIFF:
            failures.append(f"out cosine difference {out_cos:.3e} > {OUT_COS_DIFF:.1e}")
    if not lse_bad.any():
        finite = np.isfinite(r_lse)
        a_fin, r_fin = a_lse[finite], r_lse[finite]
        worst, lse_max, ok = _worst("lse", a_fin, r_fin, LSE_ATOL * scale ** 2, LSE_RTOL)
        if worst is not None:
            # Report the position in the full tensor, not in the list of finite values.
            full = tuple(int(k) for k in np.argwhere(finite)[worst.index[0]])
            lse_worst = dataclasses.replace(worst, index=full)
        if not ok:
            failures.append("lse exceeds |a - r| <= atol + rtol * |r|")
    return CompareReport(not failures, tuple(failures), out_max, out_cos, lse_max,
                         out_worst, lse_worst)


def assert_mla_close(out, lse, out_ref, lse_ref, std=0.1, msg=None):
    """Raise ``AssertionError`` unless :func:`compare_mla` passes.

    Parameters
    ----------
    out, lse, out_ref, lse_ref, std
        As for :func:`compare_mla`.
    msg : str, optional
        Context put first in the error message (for example the seed and shapes of the case).

    Returns
    -------
    CompareReport
        The passing report.

    Raises
    ------
    AssertionError
        With the failed checks, the largest errors and the worst positions.
    """
    report = compare_mla(out, lse, out_ref, lse_ref, std=std)
    if not report.passed:
        raise AssertionError(f"{msg}\n{report}" if msg else str(report))
    return report


def gpu_status():
    """Whether CuPy sees a GPU mla_cupy supports (on the current device), and if not, why.

    Returns
    -------
    (True, description) or (False, reason)
        ``description`` is e.g. ``"NVIDIA H200, compute capability 9.0"``; ``reason`` is one
        line: CuPy missing (with what installs it), no NVIDIA driver or GPU found, a driver
        too old for CuPy's CUDA runtime, or a GPU older than compute capability 8.0, with the
        underlying error in parentheses. Never raises.
    """
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - not installed, or a broken CUDA library
        return False, no_gpu_reason(exc)
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False, no_gpu_reason(None)
        device = cupy.cuda.Device()
        major, minor = divmod(int(device.compute_capability), 10)
        name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
    except Exception as exc:  # noqa: BLE001 - no driver, driver too old, no device
        return False, no_gpu_reason(exc)
    name = name.decode() if isinstance(name, bytes) else str(name)
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        need = "%d.%d" % MIN_COMPUTE_CAPABILITY
        return False, (f"CUDA GPU {device.id} ({name}) has compute capability {major}.{minor}; "
                       f"mla_cupy needs {need} or newer")
    return True, f"{name}, compute capability {major}.{minor}"
