"""Decode benchmark: ``python -m mla_cupy.bench [--quick] [--sweep standard|extra|all]
[--kernels auto,portable,sm90] [--json PATH] [--plot PNG] [--iters N] [--peer PATH]
[--no-flashinfer]``, or ``python -m mla_cupy.bench --from-json PATH [--plot PNG]`` to show (and
plot) the results of an earlier run without a GPU.

Times ``flash_mla_with_kvcache`` over the standard sweep (b = 128 at 4K tokens, uniform and
variable lengths, s_q 1 and 2, h_q 16 to 128; b = 1 and 8 at 64K; b = 1 at 1M tokens; h_kv 1,
d 576, dv 512, causal, 64-token pages) or the extra one (a skewed batch, s_q 4, a small batch,
a long context) and reports each configuration against two ceilings measured in the same run:
the read bandwidth of a plain streaming kernel and the rate of a large bf16 matrix product.
Two peers are timed on the very same arrays, alternating with mla_cupy, and their outputs
compared with ours: DeepSeek's FlashMLA (``--peer``) and FlashInfer's fa3 batch MLA kernel
(whenever ``flashinfer`` can be imported). ``--kernels`` times each of our kernel paths in turn.

Method
------
* Work per call (FlashMLA's own accounting; the causal mask's savings are ignored)::

      FLOPs = sum_i s_q * h_q * seqlen_i * 2 * (d + dv)
      bytes = sum_i seqlen_i * h_kv * d * 2  +  q bytes  +  out bytes

* Timing: CUDA events around every call, median of ``--iters`` calls after a warm-up. A short
  spin kernel is queued first so that the host enqueues all timed calls before the GPU reaches
  them: the events then measure GPU time, not Python's launch rate. The host's own cost per call
  is measured separately as the wall time of the Python call (no synchronisation), median.
* Consecutive calls read different input sets (KV cache, block table, q), cycling through at
  least 1 GiB of distinct KV (a single set when one is already that large), so that the L2
  cache cannot serve them.
* ``get_mla_metadata`` runs once per configuration, outside the timed region, as in a decode
  step that reuses it across layers; its own GPU and host times are reported beside. The
  FlashInfer peer is likewise planned once per configuration and input set, outside.
* Ratio = best peer's time / ours (above 1: mla_cupy faster); the target is our time at most
  0.95 of the best peer's.

Only the standard library and NumPy are imported at module level: the sweep, the formulas, the
formatting, reading JSON lines back and the plot are plain functions that run (and are tested)
without a GPU. CuPy is imported when the benchmark runs; PyTorch only when a peer is used;
matplotlib only for ``--plot`` (the ``plot`` extra), and its absence is reported before anything
runs. Without CuPy or a usable GPU it prints one line saying why and exits with status 2.
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time

import numpy as np

SCHEMA_VERSION = 2
GIB = 1 << 30

# Standard problem (DeepSeek V3 MLA decode).
HEAD_DIM = 576
HEAD_DIM_V = 512
PAGE_BLOCK_SIZE = 64
ELEMENT_BYTES = 2  # bf16
DATA_STD = 0.1
VARLEN_SEED = 0
VARLEN_STD = 1024

# Distinct KV bytes that one timing cycle reads, at least (the H200's L2 is 60 MB).
MIN_DISTINCT_KV_BYTES = GIB
MAX_INPUT_SETS = 64

DEFAULT_ITERS = 50
QUICK_ITERS = 30
DEFAULT_PEER_PATH = os.path.join(".peers", "flashmla")


# ---------------------------------------------------------------------------------------------
# Sweep definition (pure)
# ---------------------------------------------------------------------------------------------

def tokens_label(n):
    """Short token count: 4096 -> '4K', 65536 -> '64K', 1048576 -> '1M', 1000 -> '1000'."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One decode problem: b sequences of about ``seqlen`` cached tokens, s_q new tokens each."""

    b: int
    s_q: int
    h_q: int
    seqlen: int
    varlen: bool = False
    seqlen_std: int = VARLEN_STD
    seed: int = VARLEN_SEED
    h_kv: int = 1
    d: int = HEAD_DIM
    dv: int = HEAD_DIM_V
    page: int = PAGE_BLOCK_SIZE
    causal: bool = True
    long_seqlen: int = 0  # skewed batch: every ``long_every``-th sequence has this many tokens
    long_every: int = 0

    @property
    def name(self):
        parts = [f"b{self.b}", f"s_q{self.s_q}", f"h{self.h_q}"]
        if self.varlen:
            parts.append("varlen")
        if self.long_every:
            parts.append(f"{tokens_label(self.seqlen)}+{tokens_label(self.long_seqlen)}"
                         f"/{self.long_every}")
        elif self.seqlen != 4096:
            parts.append(tokens_label(self.seqlen))
        return " ".join(parts)

    @property
    def kv_key(self):
        """Configurations with equal keys share KV caches, block tables and cache_seqlens."""
        return (self.b, self.seqlen, self.varlen, self.seqlen_std, self.seed,
                self.h_kv, self.d, self.page, self.long_seqlen, self.long_every)

    def seqlens(self):
        """cache_seqlens as an int32 NumPy array; varlen draws N(seqlen, std) with a fixed seed;
        a skewed batch gives sequences long_every-1, 2*long_every-1, ... long_seqlen tokens."""
        if self.varlen:
            rng = np.random.default_rng(self.seed)
            draws = rng.normal(self.seqlen, self.seqlen_std, self.b)
            lens = np.maximum(np.rint(draws), 1).astype(np.int32)
        else:
            lens = np.full(self.b, self.seqlen, dtype=np.int32)
        if self.long_every:
            lens[self.long_every - 1::self.long_every] = self.long_seqlen
        return lens


def standard_sweep():
    """The standard sweep (b = 128 at 4K tokens, uniform and varlen, s_q 1-2, h_q 16-128; b = 1
    and 8 at 64K; b = 1 at 1M), grouped so that configs sharing KV are adjacent."""
    configs = []
    for varlen in (False, True):
        for s_q in (1, 2):
            for h_q in (16, 32, 64, 128):
                configs.append(BenchConfig(b=128, s_q=s_q, h_q=h_q, seqlen=4096, varlen=varlen))
    configs.append(BenchConfig(b=1, s_q=1, h_q=128, seqlen=64 << 10))
    configs.append(BenchConfig(b=8, s_q=1, h_q=128, seqlen=64 << 10))
    configs.append(BenchConfig(b=1, s_q=1, h_q=128, seqlen=1 << 20))
    return configs


def quick_sweep():
    """A handful of configurations for a fast check."""
    return [
        BenchConfig(b=128, s_q=1, h_q=16, seqlen=4096),
        BenchConfig(b=128, s_q=2, h_q=128, seqlen=4096),
        BenchConfig(b=128, s_q=1, h_q=128, seqlen=4096, varlen=True),
        BenchConfig(b=1, s_q=1, h_q=128, seqlen=64 << 10),
    ]


def extra_sweep():
    """Configurations outside the standard sweep: a skewed batch (b = 64, 1K tokens, every 8th
    sequence 16K), speculative decoding (s_q 4, h_q 16 and 32), a small batch (b = 4 at 8K) and
    the long-context shape of a model split over 8 GPUs (b = 32, h_q 16 at 32K)."""
    skew = dict(b=64, s_q=1, seqlen=1024, long_seqlen=16 << 10, long_every=8)
    return [
        BenchConfig(h_q=16, **skew),
        BenchConfig(h_q=128, **skew),
        BenchConfig(b=128, s_q=4, h_q=16, seqlen=4096),
        BenchConfig(b=128, s_q=4, h_q=32, seqlen=4096),
        BenchConfig(b=4, s_q=1, h_q=16, seqlen=8 << 10),
        BenchConfig(b=4, s_q=1, h_q=128, seqlen=8 << 10),
        BenchConfig(b=32, s_q=1, h_q=16, seqlen=32 << 10),
    ]


SWEEPS = ("standard", "extra", "all")


def sweep_configs(name):
    """The configurations of a named sweep: 'standard', 'extra' or 'all' (both, in that order)."""
    if name == "standard":
        return standard_sweep()
    if name == "extra":
        return extra_sweep()
    if name == "all":
        return standard_sweep() + extra_sweep()
    raise ValueError(f"unknown sweep {name!r}; one of {', '.join(SWEEPS)}")


def group_by_kv(configs):
    """Split into runs of consecutive configs with the same kv_key: [(key, [configs])]."""
    groups = []
    for cfg in configs:
        if groups and groups[-1][0] == cfg.kv_key:
            groups[-1][1].append(cfg)
        else:
            groups.append((cfg.kv_key, [cfg]))
    return groups


# ---------------------------------------------------------------------------------------------
# Work per call and input layout (pure)
# ---------------------------------------------------------------------------------------------

def _total_tokens(seqlens):
    return int(np.sum(np.asarray(seqlens, dtype=np.int64)))


def decode_flops(seqlens, s_q, h_q, d, dv):
    """Floating-point operations of one decode call: sum_i s_q*h_q*seqlen_i*2*(d+dv)."""
    return s_q * h_q * _total_tokens(seqlens) * 2 * (d + dv)


def decode_bytes(seqlens, s_q, h_q, d, dv, h_kv=1, element_bytes=ELEMENT_BYTES):
    """Fewest bytes one decode call moves: each KV row, q and out once."""
    b = len(seqlens)
    kv = _total_tokens(seqlens) * h_kv * d * element_bytes
    q = b * s_q * h_q * d * element_bytes
    out = b * s_q * h_q * dv * element_bytes
    return kv + q + out


def config_work(cfg):
    """(flops, bytes) of one call of a BenchConfig."""
    lens = cfg.seqlens()
    return (decode_flops(lens, cfg.s_q, cfg.h_q, cfg.d, cfg.dv),
            decode_bytes(lens, cfg.s_q, cfg.h_q, cfg.d, cfg.dv, cfg.h_kv))


def pages_per_seq(seqlens, page):
    """Pages each sequence occupies: ceil(seqlen / page)."""
    lens = np.asarray(seqlens, dtype=np.int64)
    return (lens + page - 1) // page


def kv_read_bytes(seqlens, h_kv, d, element_bytes=ELEMENT_BYTES):
    """KV bytes one call reads (the part of decode_bytes that is cache)."""
    return _total_tokens(seqlens) * h_kv * d * element_bytes


def input_sets_needed(kv_bytes_per_set, min_distinct=MIN_DISTINCT_KV_BYTES,
                      max_sets=MAX_INPUT_SETS):
    """How many distinct input sets to cycle so that at least ``min_distinct`` KV bytes are read."""
    if kv_bytes_per_set <= 0:
        return 1
    return int(min(max(1, math.ceil(min_distinct / kv_bytes_per_set)), max_sets))


def build_block_table(seqlens, page, rng):
    """A block table over a pool of exactly the pages needed, in random physical order.

    Returns (block_table int32 [b, max_pages], num_blocks). Entries past a sequence's last page
    are never read by a correct kernel; they hold page 0 so that a wrong read stays in bounds.
    """
    n_pages = pages_per_seq(seqlens, page)
    b = len(n_pages)
    num_blocks = int(n_pages.sum())
    max_pages = max(int(n_pages.max()) if b else 0, 1)
    table = np.zeros((b, max_pages), dtype=np.int32)
    perm = rng.permutation(num_blocks).astype(np.int32)
    start = 0
    for i, n in enumerate(n_pages.tolist()):
        table[i, :n] = perm[start:start + n]
        start += n
    return table, max(num_blocks, 1)


# ---------------------------------------------------------------------------------------------
# Results, table and JSON lines (pure)
# ---------------------------------------------------------------------------------------------

PEERS = ("FlashMLA", "FlashInfer")
KERNELS = ("auto", "portable", "sm90")
TARGET_FRACTION = 0.95  # the target: our time at most this fraction of the best peer's

RESULT_KEYS = (
    "kind", "config", "kernel", "b", "s_q", "h_q", "h_kv", "d", "dv", "page", "causal",
    "seqlen", "varlen", "long_seqlen", "long_every", "total_tokens", "flops", "bytes",
    "input_sets", "distinct_kv_bytes", "iters",
    "us", "us_min", "us_max", "tbps", "tflops", "pct_bw_roof", "pct_mma_roof", "host_us",
    "meta_us", "meta_host_us", "queue_ahead",
    "peer_us", "peer_us_min", "peer_us_max", "peer_tbps", "peer_tflops", "peer_host_us",
    "peer_queue_ahead",
    "fi_us", "fi_us_min", "fi_us_max", "fi_tbps", "fi_tflops", "fi_host_us", "fi_queue_ahead",
    "best_peer", "best_peer_us", "speed_ratio", "speed_ratio_flashmla",
    "speed_ratio_flashinfer", "target_met",
    "max_abs_diff_out", "max_abs_diff_lse", "fi_max_abs_diff_out", "fi_max_abs_diff_lse",
    "error", "peer_error", "fi_error", "suspect",
)

HEADER_KEYS = (
    "kind", "schema", "gpu", "sm_count", "l2_bytes", "driver", "cuda_driver_api",
    "cuda_runtime", "cupy", "nvrtc", "mla_cupy", "date", "bw_roof_tbps", "bw_roof_method",
    "mma_roof_tflops", "mma_roof_dtype", "peer", "flashinfer", "kernels", "kernels_note",
    "sweep", "iters", "quick", "min_distinct_kv_bytes", "target_fraction",
)


def derive_rates(flops, nbytes, us, bw_roof_tbps=None, mma_roof_tflops=None):
    """(TB/s, TFLOP/s, %BW-roof, %MMA-roof) for a call taking ``us`` microseconds."""
    if us is None or not us > 0:
        return None, None, None, None
    tbps = nbytes / (us * 1e-6) / 1e12
    tflops = flops / (us * 1e-6) / 1e12
    pct_bw = 100.0 * tbps / bw_roof_tbps if bw_roof_tbps else None
    pct_mma = 100.0 * tflops / mma_roof_tflops if mma_roof_tflops else None
    return tbps, tflops, pct_bw, pct_mma


def best_peer(peer_us):
    """(name, µs) of the fastest peer in a {name: µs or None} mapping; (None, None) if none ran."""
    timed = [(us, name) for name, us in peer_us.items() if us is not None and us > 0]
    if not timed:
        return None, None
    us, name = min(timed)
    return name, us


def speed_ratio(peer_us, ours_us):
    """Peer µs / our µs: above 1 means mla_cupy is faster; None when either is missing."""
    if not peer_us or not ours_us or peer_us <= 0 or ours_us <= 0:
        return None
    return peer_us / ours_us


def target_met(ours_us, best_peer_us, fraction=TARGET_FRACTION):
    """True when our time is at most ``fraction`` of the best peer's; None when not comparable."""
    if not ours_us or not best_peer_us:
        return None
    return ours_us <= fraction * best_peer_us


def beats_roof(nbytes, us, bw_roof_tbps, slack=1.05):
    """True when ``us`` would mean moving ``nbytes`` faster than the measured read roof allows:
    a timing that cannot be right (the work ran outside the events, or was skipped)."""
    if not us or not bw_roof_tbps:
        return False
    return nbytes / (us * 1e-6) / 1e12 > bw_roof_tbps * slack


def make_result(cfg, ours=None, peer=None, meta=None, *, flashinfer=None, kernel="auto",
                iters=None, input_sets=None, distinct_kv_bytes=None, bw_roof_tbps=None,
                mma_roof_tflops=None, diffs=(None, None), fi_diffs=(None, None), error=None,
                peer_error=None, fi_error=None):
    """One result record (all RESULT_KEYS present; missing measurements are None).

    ``ours``/``peer`` (FlashMLA)/``flashinfer`` are timing dicts from ``summarize_times`` (keys
    us, us_min, us_max, host_us, queue_ahead); ``meta`` likewise for get_mla_metadata.
    ``diffs``/``fi_diffs``: (max |out - peer out|, max |lse - peer lse|) against each peer.
    """
    flops, nbytes = config_work(cfg)
    ours = ours or {}
    peer = peer or {}
    fi = flashinfer or {}
    meta = meta or {}
    tbps, tflops, pct_bw, pct_mma = derive_rates(flops, nbytes, ours.get("us"),
                                                 bw_roof_tbps, mma_roof_tflops)
    p_tbps, p_tflops, _, _ = derive_rates(flops, nbytes, peer.get("us"))
    f_tbps, f_tflops, _, _ = derive_rates(flops, nbytes, fi.get("us"))
    best_name, best_us = best_peer({"FlashMLA": peer.get("us"), "FlashInfer": fi.get("us")})
    suspect = [who for who, t in (("ours", ours), ("FlashMLA", peer), ("FlashInfer", fi))
               if beats_roof(nbytes, t.get("us"), bw_roof_tbps)]
    rec = {
        "kind": "result", "config": cfg.name, "kernel": kernel, "b": cfg.b, "s_q": cfg.s_q,
        "h_q": cfg.h_q, "h_kv": cfg.h_kv, "d": cfg.d, "dv": cfg.dv, "page": cfg.page,
        "causal": cfg.causal, "seqlen": cfg.seqlen, "varlen": cfg.varlen,
        "long_seqlen": cfg.long_seqlen, "long_every": cfg.long_every,
        "total_tokens": _total_tokens(cfg.seqlens()),
        "flops": flops, "bytes": nbytes, "input_sets": input_sets,
        "distinct_kv_bytes": distinct_kv_bytes, "iters": iters,
        "us": ours.get("us"), "us_min": ours.get("us_min"), "us_max": ours.get("us_max"),
        "tbps": tbps, "tflops": tflops, "pct_bw_roof": pct_bw, "pct_mma_roof": pct_mma,
        "host_us": ours.get("host_us"), "meta_us": meta.get("us"),
        "meta_host_us": meta.get("host_us"), "queue_ahead": ours.get("queue_ahead"),
        "peer_us": peer.get("us"), "peer_us_min": peer.get("us_min"),
        "peer_us_max": peer.get("us_max"), "peer_tbps": p_tbps, "peer_tflops": p_tflops,
        "peer_host_us": peer.get("host_us"), "peer_queue_ahead": peer.get("queue_ahead"),
        "fi_us": fi.get("us"), "fi_us_min": fi.get("us_min"), "fi_us_max": fi.get("us_max"),
        "fi_tbps": f_tbps, "fi_tflops": f_tflops, "fi_host_us": fi.get("host_us"),
        "fi_queue_ahead": fi.get("queue_ahead"),
        "best_peer": best_name, "best_peer_us": best_us,
        "speed_ratio": speed_ratio(best_us, ours.get("us")),
        "speed_ratio_flashmla": speed_ratio(peer.get("us"), ours.get("us")),
        "speed_ratio_flashinfer": speed_ratio(fi.get("us"), ours.get("us")),
        "target_met": target_met(ours.get("us"), best_us),
        "max_abs_diff_out": diffs[0], "max_abs_diff_lse": diffs[1],
        "fi_max_abs_diff_out": fi_diffs[0], "fi_max_abs_diff_lse": fi_diffs[1],
        "error": error, "peer_error": peer_error, "fi_error": fi_error,
        "suspect": (" and ".join(suspect) + " faster than the read roof: timing suspect")
        if suspect else None,
    }
    return rec


def summarize_times(gpu_us, host_us, queue_ahead=None):
    """Median/min/max of per-call GPU microseconds and the median host microseconds."""
    return {
        "us": statistics.median(gpu_us) if gpu_us else None,
        "us_min": min(gpu_us) if gpu_us else None,
        "us_max": max(gpu_us) if gpu_us else None,
        "host_us": statistics.median(host_us) if host_us else None,
        "queue_ahead": queue_ahead,
    }


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return _json_safe(float(value))
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


def json_line(record):
    """One JSON line (no trailing newline); NaN/inf become null so every line is strict JSON."""
    clean = {k: _json_safe(v) for k, v in record.items()}
    return json.dumps(clean, allow_nan=False, sort_keys=False)


@dataclasses.dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: str
    width: int


def table_columns(config_width=6, kernel_column=True):
    """The table's columns; every cell of a column is padded to the column's width."""
    def col(key, title, fmt, width=5):
        return Column(key, title, fmt, max(width, len(title)))
    cols = [col("config", "config", "s", max(config_width, len("config")))]
    if kernel_column:
        cols.append(col("kernel", "kernel", "s", 8))
    cols += [
        col("us", "µs", ".1f", 7),
        col("tbps", "TB/s", ".2f"),
        col("tflops", "TFLOP/s", ".0f"),
        col("pct_bw_roof", "%BW-roof", ".1f"),
        col("pct_mma_roof", "%MMA-roof", ".1f"),
        col("peer_us", "FlashMLA µs", ".1f"),
        col("fi_us", "FlashInfer µs", ".1f"),
        col("speed_ratio", "ratio", ".3f"),
        col("target_met", "target", "flag"),
        col("host_us", "host µs", ".1f"),
        col("meta_us", "meta µs", ".1f"),
        col("max_abs_diff_out", "max|Δout|", ".1e"),
    ]
    return cols


def format_cell(value, column):
    if column.fmt == "s":
        return f"{'-' if value is None else value:<{column.width}}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "-"
    elif column.fmt == "flag":
        text = "yes" if value else "no"
    else:
        text = format(value, column.fmt)
    return f"{text:>{column.width}}"


COLUMN_SEP = "  "


def format_header(columns):
    """Two lines: the titles and a rule of the same width."""
    titles = COLUMN_SEP.join(
        f"{c.title:<{c.width}}" if c.fmt == "s" else f"{c.title:>{c.width}}"
        for c in columns)
    return [titles, "-" * len(titles)]


def format_row(record, columns):
    """One aligned table line; errors and notes follow the last column."""
    line = COLUMN_SEP.join(format_cell(record.get(c.key), c) for c in columns)
    notes = []
    if record.get("error"):
        notes.append(f"ERROR: {record['error']}")
    if record.get("peer_error"):
        notes.append(f"FlashMLA: {record['peer_error']}")
    if record.get("fi_error"):
        notes.append(f"FlashInfer: {record['fi_error']}")
    if any(record.get(k) is False for k in ("queue_ahead", "peer_queue_ahead", "fi_queue_ahead")):
        notes.append("host-bound timing")
    if record.get("suspect"):
        notes.append(record["suspect"])
    if notes:
        line += COLUMN_SEP + "; ".join(notes)
    return line


def format_table(records, columns=None):
    """The whole table as a list of lines (header, rule, one line per record)."""
    if columns is None:
        width = max([len(r.get("config", "")) for r in records] + [6])
        kernels = {r.get("kernel") or "auto" for r in records}
        columns = table_columns(width, kernel_column=kernels != {"auto"})
    return format_header(columns) + [format_row(r, columns) for r in records]


def short_error(exc, limit=160):
    """'Type: message' on one line, cut to ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def format_env(header):
    """The environment header as 'key  value' lines."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    rows = [
        ("gpu", f"{header.get('gpu')} ({header.get('sm_count')} SMs, "
                f"L2 {fmt((header.get('l2_bytes') or 0) / 2**20, '.0f')} MiB)"),
        ("driver", f"{header.get('driver')} (CUDA driver API {header.get('cuda_driver_api')})"),
        ("cuda runtime", header.get("cuda_runtime")),
        ("cupy", header.get("cupy")),
        ("nvrtc", header.get("nvrtc")),
        ("mla_cupy", header.get("mla_cupy")),
        ("date", header.get("date")),
        ("read BW roof", f"{fmt(header.get('bw_roof_tbps'), '.2f')} TB/s "
                         f"({header.get('bw_roof_method')})"),
        ("MMA roof", f"{fmt(header.get('mma_roof_tflops'), '.0f')} TFLOP/s "
                     f"(cupy.matmul {header.get('mma_roof_dtype')} 8192^3)"),
        ("FlashMLA peer", header.get("peer")),
        ("FlashInfer peer", header.get("flashinfer")),
        ("kernels", ", ".join(header.get("kernels") or ["auto"])
         + (f" ({header['kernels_note']})" if header.get("kernels_note") else "")),
        ("sweep", header.get("sweep")),
        ("method", f"median of {header.get('iters')} calls (twice that, alternating, beside "
                   f"the peers), CUDA events, queue filled ahead; "
                   f">= {fmt((header.get('min_distinct_kv_bytes') or 0) / GIB, '.0f')} GiB "
                   f"distinct KV cycled; metadata outside the timed call"),
    ]
    width = max(len(k) for k, _ in rows)
    return ["mla_cupy decode benchmark"] + [f"  {k:<{width}}  {v}" for k, v in rows]


LEGEND = (
    "µs: median GPU time per call; TB/s, TFLOP/s from the method's bytes and FLOPs;",
    "%BW-roof, %MMA-roof: against the ceilings above; FlashMLA/FlashInfer µs: same inputs;",
    "ratio: best peer µs / our µs (> 1 = mla_cupy faster); target: ours <= 0.95 x best peer;",
    "host µs: Python wall time of our call, median; meta µs: get_mla_metadata's GPU time;",
    "max|Δout|: largest |out - FlashMLA out| on one input set (FlashInfer's in the JSON lines).",
)


def read_json_lines(path):
    """(header, records) from a JSON lines file written by ``--json``: the last header line (None
    when there is none) and every result line, in order. ValueError names the file and line of
    anything that is not one JSON object per line."""
    header, records = None, []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not JSON ({exc})") from None
            if not isinstance(item, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got "
                                 f"{type(item).__name__}")
            if item.get("kind") == "header":
                header = item
            elif item.get("kind") == "result":
                records.append(item)
    return header, records


def name_matches(name, text):
    """Whether a config name contains any of the comma-separated texts of ``--filter`` (always,
    with no text)."""
    texts = [t for t in (text or "").split(",") if t]
    return not texts or any(t in name for t in texts)


def filter_records(records, text):
    """The records whose config name matches ``--filter`` (see :func:`name_matches`)."""
    return [r for r in records if name_matches(r.get("config") or "", text)]


# ---------------------------------------------------------------------------------------------
# Plot (matplotlib, the ``plot`` extra, imported only here)
# ---------------------------------------------------------------------------------------------

PLOT_EXTRA_HINT = ('from the repository root, pip install ".[plot]", or pip install matplotlib')


def plot_unavailable():
    """None when matplotlib can be imported, else one line saying what ``--plot`` needs."""
    import importlib

    try:
        importlib.import_module("matplotlib.figure")
    except ImportError as exc:
        return (f"--plot needs matplotlib, which cannot be imported ({type(exc).__name__}: "
                f"{exc}); to install it (the plot extra): {PLOT_EXTRA_HINT}")
    return None


# Colours of the bars: ours (one shade per kernel kind), then each peer.
_OURS_COLOURS = ("#1f5fa8", "#6a9fd8", "#a9c8ec")
_PEER_COLOURS = {"FlashMLA": "#d9822b", "FlashInfer": "#4c9a4c"}
_PEER_KEYS = (("FlashMLA", "peer_us"), ("FlashInfer", "fi_us"))


def plot_series(records):
    """What the plot shows, as plain data: (configs in order, {label: [µs or None per
    config]}, {label: [peer µs / our µs or None per config]}). Ours is one series per kernel
    kind ('mla_cupy', or 'mla_cupy (portable)' when several kinds were timed); each peer that
    ran on any configuration is one series; each ratio pairs a peer with one of our kinds."""
    configs, kinds = [], []
    by_key = {}
    for rec in records:
        cfg, kind = rec.get("config"), rec.get("kernel") or "auto"
        if cfg not in configs:
            configs.append(cfg)
        if kind not in kinds:
            kinds.append(kind)
        by_key[(cfg, kind)] = rec

    def ours_label(kind):
        return "mla_cupy" if kinds == ["auto"] else f"mla_cupy ({kind})"

    def peer_us(cfg, key):  # the same for every kind of a configuration: take any that has it
        for kind in kinds:
            rec = by_key.get((cfg, kind))
            if rec is not None and rec.get(key):
                return rec[key]
        return None

    times = {}
    for kind in kinds:
        times[ours_label(kind)] = [(by_key.get((c, kind)) or {}).get("us") or None
                                   for c in configs]
    peers = [(name, key) for name, key in _PEER_KEYS if any(peer_us(c, key) for c in configs)]
    for name, key in peers:
        times[name] = [peer_us(c, key) for c in configs]
    ratios = {}
    for name, _key in peers:
        for kind in kinds:
            ours = times[ours_label(kind)]
            label = f"{name} / {ours_label(kind)}"
            ratios[label] = [speed_ratio(p, o) for p, o in zip(times[name], ours)]
    return configs, times, ratios


def plot_results(records, path, header=None, target_fraction=TARGET_FRACTION):
    """Write a PNG to ``path``: per configuration, the GPU time of mla_cupy and of each peer
    (grouped bars, µs, log scale) and, when a peer ran, the speed ratio peer µs / our µs
    (above 1: mla_cupy faster) against parity and the target line at 1 / ``target_fraction``.
    Needs matplotlib (ImportError otherwise); no GPU."""
    from matplotlib import ticker
    from matplotlib.figure import Figure

    configs, times, ratios = plot_series(records)
    if not configs:
        raise ValueError("no results to plot")
    n = len(configs)
    panels = 2 if ratios else 1
    width = max(8.0, 0.55 * n + 2.5)
    fig = Figure(figsize=(width, 4.2 * panels + 1.0), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    xs = np.arange(n)

    def bars(ax, series, colours):
        k = max(len(series), 1)
        step = 0.8 / k
        for i, (label, values) in enumerate(series.items()):
            ys = [np.nan if v is None else v for v in values]
            ax.bar(xs - 0.4 + step * (i + 0.5), ys, step, label=label, color=colours[i])

    ours_labels = [label for label in times if label.startswith("mla_cupy")]
    colours = [_OURS_COLOURS[i % len(_OURS_COLOURS)] for i in range(len(ours_labels))]
    colours += [_PEER_COLOURS[label] for label in times if not label.startswith("mla_cupy")]
    ax = axes[0]
    bars(ax, times, colours)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_ylabel("GPU time per call (µs, log scale)")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")

    if ratios:
        ax = axes[1]
        ratio_colours = []
        for label in ratios:
            peer = label.split(" / ")[0]
            ratio_colours.append(_PEER_COLOURS[peer])
        bars(ax, ratios, ratio_colours)
        ax.axhline(1.0, color="grey", linewidth=1, label="parity")
        ax.axhline(1.0 / target_fraction, color="crimson", linestyle="--", linewidth=1.2,
                   label=f"target: ours <= {target_fraction:g} x the faster peer, "
                         f"ratio >= {1.0 / target_fraction:.3f} for every peer")
        ax.set_ylabel("peer µs / mla_cupy µs (> 1: mla_cupy faster)")
        values = [v for vs in ratios.values() for v in vs if v]
        low = min(values + [1.0]) * 0.9
        high = max(values + [1.0 / target_fraction]) * 1.05
        ax.set_ylim(max(0.0, low), high)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")

    axes[-1].set_xticks(xs)
    axes[-1].set_xticklabels(configs, rotation=45, ha="right", fontsize="small")
    title = "mla_cupy decode"
    if any(not label.startswith("mla_cupy") for label in times):
        title += " against " + " and ".join(label for label in times
                                            if not label.startswith("mla_cupy"))
    if header:
        where = header.get("gpu") or "?"
        date = (header.get("date") or "")[:10]
        title += f" — {where}" + (f", {date}" if date else "")
    fig.suptitle(title)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path


def parse_kernels(text):
    """'sm90,portable' -> ['sm90', 'portable'] (order kept, duplicates dropped); ValueError on an
    unknown kind."""
    kinds = []
    for word in (text or "").split(","):
        word = word.strip().lower()
        if not word:
            continue
        if word not in KERNELS:
            raise ValueError(f"unknown kernel {word!r}; one of {', '.join(KERNELS)}")
        if word not in kinds:
            kinds.append(word)
    if not kinds:
        raise ValueError("no kernel named")
    return kinds


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mla_cupy.bench",
                                description="Time mla_cupy's MLA decode against measured "
                                            "ceilings and, when present, FlashMLA and "
                                            "FlashInfer.")
    p.add_argument("--quick", action="store_true",
                   help="fewer calls per measurement and, unless --sweep is given, a handful "
                        "of configurations")
    p.add_argument("--sweep", choices=SWEEPS, default=None,
                   help="standard (default), extra (skewed batch, s_q 4, small batch, long "
                        "context) or all")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write JSON lines here (default: table only)")
    p.add_argument("--iters", type=int, default=None,
                   help=f"timed calls per measurement (default {DEFAULT_ITERS}, "
                        f"--quick {QUICK_ITERS})")
    p.add_argument("--peer", metavar="PATH", default=DEFAULT_PEER_PATH,
                   help="folder holding FlashMLA's flash_mla_interface.py (default %(default)s)")
    p.add_argument("--no-peer", action="store_true", help="do not load FlashMLA")
    p.add_argument("--flashinfer", action=argparse.BooleanOptionalAction, default=True,
                   help="time FlashInfer's fa3 MLA kernel when it can be imported "
                        "(default: on)")
    p.add_argument("--kernels", metavar="LIST", default="auto",
                   help=f"our kernel paths to time, comma-separated, from {', '.join(KERNELS)} "
                        "(default %(default)s)")
    p.add_argument("--filter", metavar="TEXT", default=None,
                   help="only configurations whose name contains TEXT (several texts "
                        "separated by commas: any of them)")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="after the run, write a PNG: per configuration, our time against each "
                        "peer's and the speed ratios with the target line (needs matplotlib, "
                        "the plot extra)")
    p.add_argument("--from-json", metavar="PATH", default=None,
                   help="run nothing: read the results of an earlier run from the JSON lines "
                        "PATH (written by --json), print their table and, with --plot, plot "
                        "them; needs no GPU (--filter applies)")
    args = p.parse_args(argv)
    if args.iters is None:
        args.iters = QUICK_ITERS if args.quick else DEFAULT_ITERS
    if args.iters < 1:
        p.error("--iters must be >= 1")
    try:
        args.kernel_list = parse_kernels(args.kernels)
    except ValueError as exc:
        p.error(f"--kernels: {exc}")
    return args


def select_configs(args):
    if args.sweep is None:
        configs = quick_sweep() if args.quick else standard_sweep()
    else:
        configs = sweep_configs(args.sweep)
    return [c for c in configs if name_matches(c.name, args.filter)]


# ---------------------------------------------------------------------------------------------
# GPU side (CuPy imported lazily)
# ---------------------------------------------------------------------------------------------

_SPIN_SRC = r"""
extern "C" __global__ void bench_spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
"""

# Streaming read: each thread loads UNROLL independent 16-byte vectors per trip of a grid-stride
# loop and folds them into one word, written out only if it hits a value that never occurs, so
# the loads stay live.
_READ_BW_SRC = r"""
template <int UNROLL>
__global__ void bench_read(const uint4* __restrict__ src, unsigned long long n,
                           unsigned int* __restrict__ sink) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int acc = 0;
    for (; i + (UNROLL - 1) * stride < n; i += UNROLL * stride) {
        uint4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) v[u] = src[i + u * stride];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n; i += stride) {
        uint4 v = src[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;
}
"""


@dataclasses.dataclass
class _Samples:
    gpu_us: list
    host_us: list
    queue_ahead: bool

    def __add__(self, other):
        return _Samples(self.gpu_us + other.gpu_us, self.host_us + other.host_us,
                        bool(self.queue_ahead and other.queue_ahead))

    def summary(self):
        return summarize_times(self.gpu_us, self.host_us, self.queue_ahead)


class _Timer:
    """CUDA-event timing of many calls with the host kept ahead of the GPU."""

    def __init__(self, cp, max_calls, stream):
        self.cp = cp
        self.stream = stream
        self.spin = cp.RawKernel(_SPIN_SRC, "bench_spin")
        self.starts = [cp.cuda.Event() for _ in range(max_calls)]
        self.ends = [cp.cuda.Event() for _ in range(max_calls)]

    def run(self, fn, n_calls, host_us_estimate):
        """Time ``fn(k)`` for k in range(n_calls); returns the raw _Samples."""
        cp = self.cp
        n_calls = min(n_calls, len(self.starts))
        spin_ns = int(min(n_calls * host_us_estimate * 2.0 + 5000.0, 500_000.0) * 1000)
        stream = self.stream
        stream.synchronize()
        gc_was_on = gc.isenabled()
        gc.disable()  # as timeit does: no collector pauses inside the timed calls
        try:
            t_begin = time.perf_counter()
            self.spin((1,), (1,), (np.uint64(spin_ns),), stream=stream)
            host = []
            for k in range(n_calls):
                self.starts[k].record(stream)
                t0 = time.perf_counter_ns()
                fn(k)
                t1 = time.perf_counter_ns()
                self.ends[k].record(stream)
                host.append((t1 - t0) / 1e3)
            enqueue_s = time.perf_counter() - t_begin
        finally:
            if gc_was_on:
                gc.enable()
        self.ends[n_calls - 1].synchronize()
        gpu = [cp.cuda.get_elapsed_time(self.starts[k], self.ends[k]) * 1e3
               for k in range(n_calls)]
        return _Samples(gpu, host, enqueue_s * 1e9 < spin_ns)


def _warm(cp, fn, n_calls):
    """Call fn(k) n_calls times, synchronise; return the median host µs of the later half."""
    host = []
    for k in range(n_calls):
        t0 = time.perf_counter_ns()
        fn(k)
        host.append((time.perf_counter_ns() - t0) / 1e3)
        if k == 0:
            cp.cuda.get_current_stream().synchronize()  # first call may compile
    cp.cuda.get_current_stream().synchronize()
    tail = host[len(host) // 2:] or host
    return statistics.median(tail)


def _bf16_dtype(cp):
    try:
        return cp.dtype("bfloat16")
    except TypeError:
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)


def _to_bf16(cp, x32):
    """float32 CuPy array -> bfloat16 (round to nearest even)."""
    bf16 = _bf16_dtype(cp)
    try:
        return x32.astype(bf16)
    except Exception:  # no bf16 cast in this CuPy: round the bit patterns ourselves
        u = x32.view(cp.uint32)
        rounded = (u + cp.uint32(0x7FFF) + ((u >> 16) & cp.uint32(1))) >> 16
        return rounded.astype(cp.uint16).view(bf16)


def _to_f32(cp, x):
    try:
        return x.astype(cp.float32)
    except Exception:
        return (x.view(cp.uint16).astype(cp.uint32) << 16).view(cp.float32)


def _random_bf16(cp, rs, shape, std=DATA_STD):
    x = rs.standard_normal(shape, dtype=cp.float32)
    x *= std
    out = _to_bf16(cp, x)
    del x
    return out


def _gpu_env(cp):
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    drv_api = cp.cuda.runtime.driverGetVersion()
    rt = cp.cuda.runtime.runtimeGetVersion()
    driver = None
    try:
        import pynvml
        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        try:
            with open("/proc/driver/nvidia/version") as f:
                for word in f.read().split():
                    if word.count(".") >= 1 and word.replace(".", "").isdigit():
                        driver = word
                        break
        except OSError:
            pass
    try:
        nvrtc = ".".join(str(v) for v in cp.cuda.nvrtc.getVersion())
    except Exception as exc:
        nvrtc = f"unknown ({short_error(exc, 60)})"
    try:
        import mla_cupy
        version = getattr(mla_cupy, "__version__", None)
        if version is None:
            from mla_cupy._version import __version__ as version
    except Exception as exc:
        version = f"unavailable ({short_error(exc, 80)})"
    return {
        "gpu": name, "sm_count": props["multiProcessorCount"],
        "l2_bytes": props.get("l2CacheSize"), "driver": driver or "unknown",
        "cuda_driver_api": f"{drv_api // 1000}.{drv_api % 1000 // 10}",
        "cuda_runtime": f"{rt // 1000}.{rt % 1000 // 10}", "cupy": cp.__version__,
        "nvrtc": nvrtc, "mla_cupy": version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def measure_read_bw(cp, timer, sm_count, nbytes=4 * GIB, iters=10):
    """Best streaming-read bandwidth (TB/s) over a few unroll depths and grid sizes."""
    mod = cp.RawModule(code=_READ_BW_SRC, options=("-std=c++17",),
                       name_expressions=["bench_read<4>", "bench_read<8>"])
    buf = cp.empty(nbytes // 16 * 16, dtype=cp.uint8)
    buf.fill(0x3C)
    sink = cp.zeros(1, dtype=cp.uint32)
    n = np.uint64(buf.nbytes // 16)
    best, best_how = 0.0, ""
    try:
        for unroll in (4, 8):
            kern = mod.get_function(f"bench_read<{unroll}>")
            for blocks_per_sm, threads in ((4, 512), (8, 256), (16, 256)):
                grid = (sm_count * blocks_per_sm,)
                def call(_k, kern=kern, grid=grid, threads=threads):
                    kern(grid, (threads,), (buf, n, sink))
                _warm(cp, call, 2)
                us = timer.run(call, iters, 10.0).summary()["us"]
                tbps = buf.nbytes / (us * 1e-6) / 1e12
                if tbps > best:
                    best = tbps
                    best_how = (f"{buf.nbytes / GIB:.0f} GiB read, 16 B loads, {unroll} in "
                                f"flight, {grid[0]}x{threads}")
    finally:
        buf = sink = None
        cp.get_default_memory_pool().free_all_blocks()
    return best, best_how


def measure_mma(cp, timer, n=8192, iters=10):
    """cupy.matmul rate (TFLOP/s) on random n^3 bf16 (fp16 if bf16 fails); returns (rate, dtype)."""
    rs = cp.random.RandomState(7)
    result = (None, "unavailable")
    for dtype_name in ("bfloat16", "float16"):
        try:
            if dtype_name == "bfloat16":
                a = _random_bf16(cp, rs, (n, n), 1.0)
                b = _random_bf16(cp, rs, (n, n), 1.0)
            else:
                a = rs.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
                b = rs.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
            c = cp.empty((n, n), dtype=a.dtype)

            def call(_k):
                cp.matmul(a, b, out=c)
            _warm(cp, call, 3)
            us = timer.run(call, iters, 20.0).summary()["us"]
            result = (2.0 * n ** 3 / (us * 1e-6) / 1e12, dtype_name)
            break
        except Exception as exc:
            result = (None, f"{dtype_name} failed: {short_error(exc, 80)}")
        finally:
            a = b = c = None
            cp.get_default_memory_pool().free_all_blocks()
    return result


class _Torch:
    """PyTorch on CuPy's current stream, shared by the peers (both are torch libraries)."""

    def __init__(self, cp):
        import torch  # only here: the peers need it
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no GPU")
        self.torch, self.cp = torch, cp
        # The peers must run on CuPy's current stream so that our events bracket their kernels.
        # Initialise torch's CUDA state first: its lazy initialisation resets the current stream.
        torch.cuda.init()
        torch.cuda.set_device(cp.cuda.Device().id)
        self.stream = torch.cuda.ExternalStream(cp.cuda.get_current_stream().ptr)
        self.ensure_stream()
        self.version = getattr(torch, "__version__", "?")

    def ensure_stream(self):
        """Make torch's current stream CuPy's, and check that it took."""
        torch = self.torch
        want = self.cp.cuda.get_current_stream().ptr
        if torch.cuda.current_stream().cuda_stream != want:
            torch.cuda.set_stream(self.stream)
        got = torch.cuda.current_stream().cuda_stream
        if got != want:
            raise RuntimeError(f"torch runs on stream {got:#x}, not CuPy's {want:#x}")

    def tensor(self, arr):
        torch = self.torch
        try:
            return torch.from_dlpack(arr)
        except Exception:
            if arr.dtype.itemsize == 2 and arr.dtype.kind not in "iuf":
                return torch.from_dlpack(arr.view(self.cp.int16)).view(torch.bfloat16)
            raise

    def to_cupy(self, t):
        cp = self.cp
        try:
            return cp.from_dlpack(t)
        except Exception:
            if t.dtype == self.torch.bfloat16:
                return cp.from_dlpack(t.view(self.torch.int16)).view(_bf16_dtype(cp))
            raise

    def release(self):
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()


_TORCH = []


def _torch_bridge(cp):
    if not _TORCH:
        _TORCH.append(_Torch(cp))
    return _TORCH[0]


class _Peer:
    """DeepSeek's FlashMLA (a torch extension), called on torch views of our CuPy arrays."""

    name = "FlashMLA"

    def __init__(self, path, cp):
        self.t = _torch_bridge(cp)
        if path not in sys.path:
            sys.path.insert(0, path)
        import flash_mla_interface as fm
        self.fm, self.cp = fm, cp
        self.version = self.t.version

    def prepare(self, cfg, qs, kv_sets, cache_seqlens, scale):
        """A call(k) running set k % n_sets, and a function turning its result into CuPy
        (out [b, s_q, h_q, dv], lse [b, h_q, s_q])."""
        t = self.t
        t_seqlens = t.tensor(cache_seqlens)
        n_sets = len(kv_sets)
        t_sets = [(t.tensor(qs[j]), t.tensor(kv_sets[j][0]), t.tensor(kv_sets[j][1]),
                   self.fm.get_mla_metadata()[0]) for j in range(n_sets)]
        t.ensure_stream()
        fm = self.fm

        def call(k):
            tq, tk, tt, sched = t_sets[k % n_sets]
            return fm.flash_mla_with_kvcache(tq, tk, tt, t_seqlens, cfg.dv, sched, None,
                                             softmax_scale=scale, causal=cfg.causal)

        def result(res):
            out, lse = res
            return t.to_cupy(out), t.to_cupy(lse)
        return call, result

    def release(self):
        self.t.release()


def _load_peer(path, cp):
    """(_Peer or None, description)."""
    if not path or not os.path.isdir(path):
        return None, "not found (put FlashMLA's flash_mla_interface.py and its library there, or pass --peer)"
    if not os.path.isfile(os.path.join(path, "flash_mla_interface.py")):
        return None, "no flash_mla_interface.py in the peer folder"
    try:
        peer = _Peer(path, cp)
    except Exception as exc:
        return None, f"not loaded: {short_error(exc, 120)}"
    return peer, f"FlashMLA (torch {peer.version}), same inputs, alternating with ours"


FLASHINFER_WORKSPACE_BYTES = 256 << 20


def flashinfer_csr(seqlens, block_table, s_q, page):
    """FlashInfer's CSR plan metadata from cache_seqlens and a block table (NumPy, int32):
    (qo_indptr [b+1], kv_indptr [b+1], kv_page_ids [sum of pages], kv_lens [b])."""
    lens = np.asarray(seqlens, dtype=np.int32)
    b = len(lens)
    pages = pages_per_seq(lens, page)
    qo_indptr = (np.arange(b + 1, dtype=np.int64) * s_q).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    table = np.asarray(block_table)
    ids = [table[i, :n] for i, n in enumerate(pages.tolist())]
    kv_page_ids = (np.concatenate(ids) if ids else np.zeros(0)).astype(np.int32)
    return qo_indptr, kv_indptr, kv_page_ids, lens.copy()


class _FlashInfer:
    """FlashInfer's fa3 batch MLA kernel (BatchMLAPagedAttentionWrapper), planned once per
    configuration and input set outside the timed calls; q as [b*s_q, h_q, d], the KV pool as
    [pages, page, d] (views of our arrays, no copies)."""

    name = "FlashInfer"

    def __init__(self, cp):
        self.t = _torch_bridge(cp)
        import flashinfer
        from flashinfer.mla import BatchMLAPagedAttentionWrapper, MLAPlanMetadata
        self.cp = cp
        self.version = getattr(flashinfer, "__version__", "?")
        self.wrapper_cls, self.meta_cls = BatchMLAPagedAttentionWrapper, MLAPlanMetadata
        self.workspace = self.t.torch.empty(FLASHINFER_WORKSPACE_BYTES,
                                            dtype=self.t.torch.uint8, device="cuda")
        self._probe()

    def _plan(self, cfg, lens, table, scale):
        torch = self.t.torch
        qo, kv_indptr, ids, kv_lens = flashinfer_csr(lens, table, cfg.s_q, cfg.page)
        meta = self.meta_cls.csr(*(torch.from_numpy(x) for x in (qo, kv_indptr, ids, kv_lens)))
        w = self.wrapper_cls(self.workspace, backend="fa3")
        w.plan(metadata=meta, num_heads=cfg.h_q, head_dim_ckv=cfg.dv,
               head_dim_kpe=cfg.d - cfg.dv, page_size=cfg.page, causal=cfg.causal,
               sm_scale=scale, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
               lse_mode="basee")
        return w

    def _probe(self):
        """Plan and run a tiny problem, so that a missing build shows at load, not per row."""
        cp, torch = self.cp, self.t.torch
        cfg = BenchConfig(b=1, s_q=1, h_q=16, seqlen=PAGE_BLOCK_SIZE)
        w = self._plan(cfg, cfg.seqlens(), np.zeros((1, 1), np.int32), cfg.d ** -0.5)
        q = torch.zeros((1, cfg.h_q, cfg.d), dtype=torch.bfloat16, device="cuda")
        kv = torch.zeros((1, cfg.page, cfg.d), dtype=torch.bfloat16, device="cuda")
        self.t.ensure_stream()
        w.run(query=q, kv_cache=kv, return_lse=True, return_lse_base_on_e=True)
        cp.cuda.get_current_stream().synchronize()

    def prepare(self, cfg, qs, kv_sets, cache_seqlens, scale):
        t = self.t
        lens = cfg.seqlens()
        sets = []
        for j, (k_cache, _table, table_np) in enumerate(kv_sets):
            w = self._plan(cfg, lens, table_np, scale)
            tq = t.tensor(qs[j]).reshape(cfg.b * cfg.s_q, cfg.h_q, cfg.d)
            tk = t.tensor(k_cache).reshape(k_cache.shape[0], cfg.page, cfg.h_kv * cfg.d)
            sets.append((w, tq, tk))
        t.ensure_stream()
        n_sets = len(sets)

        def call(k):
            w, tq, tk = sets[k % n_sets]
            return w.run(query=tq, kv_cache=tk, return_lse=True, return_lse_base_on_e=True)

        def result(res):
            out, lse = res  # [b*s_q, h_q, dv], [b*s_q, h_q]
            out = t.to_cupy(out).reshape(cfg.b, cfg.s_q, cfg.h_q, cfg.dv)
            lse = t.to_cupy(lse).reshape(cfg.b, cfg.s_q, cfg.h_q).transpose(0, 2, 1)
            return out, lse
        return call, result

    def release(self):
        self.t.release()


def _load_flashinfer(enabled, cp):
    """(_FlashInfer or None, description)."""
    if not enabled:
        return None, "disabled (--no-flashinfer)"
    import importlib.util
    try:
        found = importlib.util.find_spec("flashinfer") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return None, "not importable (flashinfer is not on the Python path)"
    try:
        peer = _FlashInfer(cp)
    except Exception as exc:
        return None, f"not loaded: {short_error(exc, 120)}"
    return peer, (f"FlashInfer {peer.version} fa3 (torch {peer.t.version}), same inputs, "
                  f"alternating with ours")


def kernels_available(kinds):
    """(kinds that can run, note): forcing a path needs mla_cupy._select.forced; without it
    only 'auto' runs."""
    if all(k == "auto" for k in kinds):
        return list(kinds), None
    try:
        from mla_cupy import _select
        _select.forced  # noqa: B018
    except (ImportError, AttributeError) as exc:
        return ["auto"], f"cannot force a kernel path here ({short_error(exc, 80)}); auto only"
    return list(kinds), None


def _kernel_context(kind):
    if kind == "auto":
        return contextlib.nullcontext()
    from mla_cupy import _select
    return _select.forced(kind)


def _make_kv_sets(cp, cfg, n_sets, seed):
    """n_sets (k_cache, block_table, block_table on the host) plus the shared cache_seqlens."""
    lens = cfg.seqlens()
    rng = np.random.default_rng(seed)
    rs = cp.random.RandomState(seed)
    sets = []
    for _ in range(n_sets):
        table, num_blocks = build_block_table(lens, cfg.page, rng)
        k_cache = _random_bf16(cp, rs, (num_blocks, cfg.page, cfg.h_kv, cfg.d))
        sets.append((k_cache, cp.asarray(table), table))
    return cp.asarray(lens), sets


def _max_diffs(cp, ours, other):
    """(max |out - other out|, max |lse - other lse|) as floats, both in float32."""
    o_out, o_lse = ours
    p_out, p_lse = other
    cp.cuda.get_current_stream().synchronize()
    d_out = float(cp.max(cp.abs(_to_f32(cp, cp.asarray(o_out)) - _to_f32(cp, p_out))))
    d_lse = float(cp.max(cp.abs(cp.asarray(o_lse, dtype=cp.float32)
                                - cp.asarray(p_lse).astype(cp.float32))))
    return d_out, d_lse


def _run_config(cp, cfg, kv, timer, args, roofs, ours_api, ours_api_error, peers, kernels):
    """Time our call once per kernel kind and each peer on the same inputs, in two alternating
    rounds (ours per kind, then each peer; again), and compare outputs; one record per kind."""
    cache_seqlens, kv_sets = kv
    n_sets = len(kv_sets)
    iters = args.iters
    scale = cfg.d ** -0.5
    lens = cfg.seqlens()
    distinct = n_sets * kv_read_bytes(lens, cfg.h_kv, cfg.d)
    common = dict(iters=iters, input_sets=n_sets, distinct_kv_bytes=distinct,
                  bw_roof_tbps=roofs[0], mma_roof_tflops=roofs[1])
    rs = cp.random.RandomState(1000 + cfg.s_q * 1000 + cfg.h_q)
    qs = [_random_bf16(cp, rs, (cfg.b, cfg.s_q, cfg.h_q, cfg.d)) for _ in range(n_sets)]
    n_warm = max(n_sets, 3)
    n_timed = max(iters, 1)

    ours = {}
    for kind in kernels:
        st = ours[kind] = {"samples": None, "meta": None, "error": None, "out": None}
        if ours_api is None:
            st["error"] = ours_api_error
            continue
        try:
            get_meta, decode = ours_api
            q_per_k = cfg.s_q * cfg.h_q // cfg.h_kv
            with _kernel_context(kind):
                def meta_call(_k):
                    return get_meta(cache_seqlens, q_per_k, cfg.h_kv)
                sched, splits = meta_call(0)

                def ours_call(k, sched=sched, splits=splits):
                    j = k % n_sets
                    k_cache, table, _ = kv_sets[j]
                    return decode(qs[j], k_cache, table, cache_seqlens, cfg.dv, sched, splits,
                                  softmax_scale=scale, causal=cfg.causal)
                host_est = _warm(cp, ours_call, n_warm)
                now = cp.cuda.get_current_stream().ptr
                if now != timer.stream.ptr:
                    raise RuntimeError(f"mla_cupy changed CuPy's current stream from "
                                       f"{timer.stream.ptr:#x} to {now:#x}")
                st["samples"] = timer.run(ours_call, n_timed, host_est)
                st["out"] = ours_call(0)
                meta_est = _warm(cp, meta_call, 3)
                st["meta"] = timer.run(meta_call, n_timed, meta_est).summary()
            st["call"], st["host_est"] = ours_call, host_est
        except Exception as exc:
            st["error"] = short_error(exc)

    theirs = {}
    for name, peer in peers.items():
        st = theirs[name] = {"samples": None, "error": None, "out": None}
        if peer is None:
            continue
        try:
            call, result = peer.prepare(cfg, qs, kv_sets, cache_seqlens, scale)
            host_est = _warm(cp, call, n_warm)
            st["samples"] = timer.run(call, n_timed, host_est)
            st["out"] = result(call(0))
            st["call"], st["host_est"] = call, host_est
        except Exception as exc:
            st["error"] = short_error(exc)

    # Second round, so that slow drift (clocks, temperature) falls on every side alike.
    if any(st["samples"] is not None for st in theirs.values()) or len(kernels) > 1:
        for kind, st in ours.items():
            if st["samples"] is None:
                continue
            try:
                with _kernel_context(kind):
                    st["samples"] = st["samples"] + timer.run(st["call"], n_timed,
                                                              st["host_est"])
            except Exception as exc:
                st["error"] = short_error(exc)
        for name, st in theirs.items():
            if st["samples"] is None:
                continue
            try:
                st["samples"] = st["samples"] + timer.run(st["call"], n_timed, st["host_est"])
            except Exception as exc:
                st["error"] = short_error(exc)

    def summary(st):
        return st["samples"].summary() if st["samples"] is not None else None

    fm, fi = theirs.get("FlashMLA", {}), theirs.get("FlashInfer", {})
    records = []
    for kind, st in ours.items():
        diffs, fi_diffs = [None, None], [None, None]
        for other, target in ((fm, diffs), (fi, fi_diffs)):
            if st["out"] is not None and other.get("out") is not None:
                try:
                    target[:] = _max_diffs(cp, st["out"], other["out"])
                except Exception as exc:
                    st["error"] = st["error"] or f"compare: {short_error(exc)}"
        records.append(make_result(
            cfg, summary(st), summary(fm) if fm else None, st["meta"],
            flashinfer=summary(fi) if fi else None, kernel=kind, diffs=tuple(diffs),
            fi_diffs=tuple(fi_diffs), error=st["error"], peer_error=fm.get("error"),
            fi_error=fi.get("error"), **common))
    return records


def run(args, emit=print):
    """Run the benchmark described by parsed ``args``; returns (header, records)."""
    import cupy as cp

    json_file = None
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        json_file = open(args.json, "w")

    def write_json(rec):
        if json_file is not None:
            json_file.write(json_line(rec) + "\n")
            json_file.flush()

    # A context, not stream.use(): CuPy restores the current stream on leaving a stream context
    # to the enclosing context's, so a use() would not survive a library's own `with stream:`.
    stream = cp.cuda.Stream(non_blocking=True)
    try:
        with stream:
            return _run_on_stream(cp, args, emit, stream, write_json)
    finally:
        if json_file is not None:
            json_file.close()
            emit(f"JSON lines: {args.json}")


def _run_on_stream(cp, args, emit, stream, write_json):
    configs = select_configs(args)
    env = _gpu_env(cp)
    timer = _Timer(cp, max(args.iters, 16), stream)

    try:
        bw, bw_how = measure_read_bw(cp, timer, env["sm_count"])
    except Exception as exc:
        bw, bw_how = None, f"failed: {short_error(exc, 100)}"
    mma, mma_dtype = measure_mma(cp, timer)

    peer, peer_desc = (None, "disabled (--no-peer)") if args.no_peer else \
        _load_peer(args.peer, cp)
    fi, fi_desc = _load_flashinfer(args.flashinfer, cp)
    peers = {"FlashMLA": peer, "FlashInfer": fi}
    kernels, kernels_note = kernels_available(getattr(args, "kernel_list", ["auto"]))

    try:
        import mla_cupy
        ours_api = (mla_cupy.get_mla_metadata, mla_cupy.flash_mla_with_kvcache)
        ours_api_error = None
    except Exception as exc:
        ours_api, ours_api_error = None, short_error(exc)

    sweep = args.sweep or ("quick" if args.quick else "standard")
    header = dict(env, kind="header", schema=SCHEMA_VERSION, bw_roof_tbps=bw,
                  bw_roof_method=bw_how, mma_roof_tflops=mma, mma_roof_dtype=mma_dtype,
                  peer=peer_desc, flashinfer=fi_desc, kernels=kernels,
                  kernels_note=kernels_note, sweep=sweep + (f", filter {args.filter!r}"
                                                            if args.filter else ""),
                  iters=args.iters, quick=bool(args.quick),
                  min_distinct_kv_bytes=MIN_DISTINCT_KV_BYTES, target_fraction=TARGET_FRACTION)
    header = {k: header.get(k) for k in HEADER_KEYS}
    write_json(header)
    for line in format_env(header):
        emit(line)
    emit("")
    columns = table_columns(max([len(c.name) for c in configs] + [6]),
                            kernel_column=kernels != ["auto"])
    for line in format_header(columns):
        emit(line)

    records = []
    for _key, group in group_by_kv(configs):
        kv = None
        try:
            lens = group[0].seqlens()
            n_sets = input_sets_needed(kv_read_bytes(lens, group[0].h_kv, group[0].d))
            kv = _make_kv_sets(cp, group[0], n_sets, seed=len(records) + 17)
            kv_error = None
        except Exception as exc:
            kv_error = short_error(exc)
        for cfg in group:
            if kv is None:
                recs = [make_result(cfg, error=f"inputs: {kv_error}", iters=args.iters,
                                    kernel=kind) for kind in kernels]
            else:
                try:
                    recs = _run_config(cp, cfg, kv, timer, args, (bw, mma), ours_api,
                                       ours_api_error, peers, kernels)
                except Exception as exc:
                    recs = [make_result(cfg, error=short_error(exc), iters=args.iters,
                                        kernel=kind) for kind in kernels]
            for rec in recs:
                records.append(rec)
                write_json(rec)
                emit(format_row(rec, columns))
        kv = None
        try:
            for p in peers.values():
                if p is not None:
                    p.release()
            gc.collect()
            cp.get_default_memory_pool().free_all_blocks()
        except Exception:
            pass

    emit("")
    for line in LEGEND:
        emit(line)
    return header, records


def show_json(args, emit=print):
    """``--from-json``: the table (and with ``--plot`` the plot) of an earlier run's JSON lines;
    returns the exit status."""
    try:
        header, records = read_json_lines(args.from_json)
    except (OSError, ValueError) as exc:
        print(f"python -m mla_cupy.bench: --from-json: {short_error(exc, 300)}", file=sys.stderr,
              flush=True)
        return 2
    records = filter_records(records, args.filter)
    if not records:
        print(f"python -m mla_cupy.bench: --from-json: no results in {args.from_json}"
              + (f" matching --filter {args.filter!r}" if args.filter else ""),
              file=sys.stderr, flush=True)
        return 2
    if header is not None:
        for line in format_env(header):
            emit(line)
        emit("")
    for line in format_table(records):
        emit(line)
    if args.plot:
        try:
            plot_results(records, args.plot, header)
        except Exception as exc:  # the table is out already: say why there is no plot
            print(f"python -m mla_cupy.bench: --plot {args.plot}: {short_error(exc, 300)}",
                  file=sys.stderr, flush=True)
            return 1
        emit(f"plot: {args.plot}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:  # the table uses 'µ' and 'Δ'; never die on a terminal that cannot show them
        sys.stdout.reconfigure(errors="replace")
    except (AttributeError, ValueError):
        pass
    emit = lambda line: print(line, flush=True)  # noqa: E731
    if args.plot:  # before anything runs: a missing matplotlib must not cost a whole sweep
        problem = plot_unavailable()
        if problem is None:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
            except OSError as exc:
                problem = f"--plot {args.plot}: {short_error(exc)}"
        if problem:
            print(f"python -m mla_cupy.bench: {problem}", file=sys.stderr, flush=True)
            return 2
    if args.from_json:
        return show_json(args, emit)
    from mla_cupy.testing import gpu_status

    ok, reason = gpu_status()
    if not ok:  # one line, no traceback: nothing here can run without CuPy and a GPU
        print(f"python -m mla_cupy.bench: cannot run: {reason}", file=sys.stderr, flush=True)
        return 2
    header, records = run(args, emit=emit)
    if args.plot:
        try:
            plot_results(records, args.plot, header)
        except Exception as exc:  # the run's table is out already: say why there is no plot
            print(f"python -m mla_cupy.bench: --plot {args.plot}: {short_error(exc, 300)}",
                  file=sys.stderr, flush=True)
            return 1
        emit(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
