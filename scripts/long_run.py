"""A long run: many decode steps with changing batch sizes and shapes, watching memory.

Each step picks a batch size, a query length, a head count and a dtype at random (more call
signatures than the library's plan caches hold, so entries are dropped and rebuilt all along),
a stream out of four, and runs ``get_mla_metadata`` and ``flash_mla_with_kvcache`` on views of
preallocated inputs. Every ``--every`` steps it waits for the GPU, checks one small fixed problem
against the float64 reference, and prints a row: host RSS, CuPy's pool (used / held), device
memory in use (``cudaMemGetInfo``), the split-KV workspace and the cached plans. The last line
says whether memory stayed flat: after the first tenth of the run, none of host RSS, the pool's
held bytes and the device's used bytes grew by more than ``--tolerance-mib``.

Usage (repo root, GPU machine): PYTHONPATH=. python3 scripts/long_run.py [--calls 100000]
[--every N] [--max-batch 64] [--seed 0]. Exit status 0 when memory stayed flat and every check
passed, 1 otherwise, 2 without a usable GPU.
"""

import argparse
import os
import sys
import time

import numpy as np

D, DV, PAGE, MAX_SEQLEN = 576, 512, 64, 2048
S_Q = (1, 2, 4)
H_Q = (16, 32, 64, 128)
DTYPES = ("bfloat16", "float16")
STREAMS = 4
MIB = 1 << 20


def host_rss():
    """Resident set size of this process in bytes (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Inputs:
    """Device inputs sized for the largest step; each step takes views of them."""

    def __init__(self, cupy, rng, max_batch):
        from mla_cupy.bench import _to_bf16

        pages = MAX_SEQLEN // PAGE
        num_blocks = max_batch * pages + 8
        self.q, self.k_cache = {}, {}
        for dtype in DTYPES:
            def convert(x):
                return _to_bf16(cupy, x) if dtype == "bfloat16" else x.astype(cupy.float16)

            q = cupy.random.standard_normal(max_batch * max(S_Q) * max(H_Q) * D, dtype=cupy.float32) * 0.1
            self.q[dtype] = convert(q)
            kc = cupy.random.standard_normal((num_blocks, PAGE, 1, D), dtype=cupy.float32) * 0.1
            self.k_cache[dtype] = convert(kc)
            del q, kc
        table = rng.permutation(num_blocks)[:max_batch * pages].reshape(max_batch, pages)
        self.block_table = cupy.asarray(table.astype(np.int32))
        lengths = rng.integers(0, MAX_SEQLEN + 1, size=(32, max_batch))
        lengths[:, 0] = rng.integers(1, 8, size=32)  # short sequences in every set too
        self.seqlens = [cupy.asarray(row.astype(np.int32)) for row in lengths]

    def step(self, batch, s_q, h_q, dtype, k):
        q = self.q[dtype][:batch * s_q * h_q * D].reshape(batch, s_q, h_q, D)
        return q, self.k_cache[dtype], self.block_table[:batch], self.seqlens[k][:batch]


class Check:
    """A small fixed problem and its float64 reference, run at every row of the table."""

    def __init__(self, cupy, seed):
        from mla_cupy.reference import flash_mla_with_kvcache_reference
        from mla_cupy.testing import make_decode_inputs

        self.inp = make_decode_inputs(3, 2, 16, 1, head_dim=D, head_dim_v=DV, page_block_size=PAGE,
                                      seqlens=[1, 300, 777], seed=seed)
        self.dev = [cupy.asarray(x) for x in (self.inp.q, self.inp.k_cache, self.inp.block_table,
                                              self.inp.cache_seqlens)]
        self.ref = flash_mla_with_kvcache_reference(self.inp.q, self.inp.k_cache, self.inp.block_table,
                                                    self.inp.cache_seqlens, DV, causal=True)

    def __call__(self):
        from mla_cupy import flash_mla_with_kvcache, get_mla_metadata
        from mla_cupy.testing import compare_mla

        q, kc, bt, sl = self.dev
        out, lse = flash_mla_with_kvcache(q, kc, bt, sl, DV, *get_mla_metadata(sl, 32, 1), causal=True)
        return compare_mla(out.get(), lse.get(), *self.ref, std=self.inp.std)


def sample(cupy, interface, calls, seconds):
    pool = cupy.get_default_memory_pool()
    free, total = cupy.cuda.runtime.memGetInfo()
    streams, ws_bytes, retired_bytes = interface._workspace_bytes()
    plans = len(interface._plans) + len(interface._fast_plans)
    return dict(calls=calls, seconds=seconds, rss=host_rss(), pool_used=pool.used_bytes(),
                pool_held=pool.total_bytes(), device_used=total - free, workspace=ws_bytes,
                retired=retired_bytes, streams=streams, plans=plans)


HEADER = (f"{'calls':>9s} {'s':>7s} {'calls/s':>8s} {'host RSS MiB':>12s} {'pool used MiB':>13s} "
          f"{'pool held MiB':>13s} {'device used MiB':>15s} {'workspace MiB':>13s} {'retired MiB':>11s} "
          f"{'streams':>7s} {'plans':>5s}  check")


def row(s, rate, check):
    return (f"{s['calls']:9d} {s['seconds']:7.1f} {rate:8.0f} {s['rss'] / MIB:12.1f} {s['pool_used'] / MIB:13.1f} "
            f"{s['pool_held'] / MIB:13.1f} {s['device_used'] / MIB:15.1f} {s['workspace'] / MIB:13.1f} "
            f"{s['retired'] / MIB:11.1f} {s['streams']:7d} {s['plans']:5d}  {check}")


def flat(samples, calls, tolerance):
    """(stayed flat, description) from the first sample past a tenth of the run to the last."""
    base = next(s for s in samples if s["calls"] >= calls // 10)
    last = samples[-1]
    growth = {name: (last[key] - base[key]) / MIB
              for name, key in (("host RSS", "rss"), ("pool held", "pool_held"), ("device used", "device_used"))}
    ok = all(g <= tolerance for g in growth.values())
    text = ", ".join(f"{name} {g:+.1f} MiB" for name, g in growth.items())
    return ok, f"{text} from call {base['calls']} to call {last['calls']} (tolerance {tolerance} MiB)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100_000, help="decode steps (default 100000)")
    parser.add_argument("--every", type=int, default=0, help="steps between rows (default: calls / 20)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--tolerance-mib", type=float, default=64.0,
                        help="growth after the first tenth of the run still counted as flat (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.max_batch < 1:
        parser.error("--calls and --max-batch must be >= 1")
    every = args.every or max(args.calls // 20, 1)

    from mla_cupy.testing import gpu_status

    ok, reason = gpu_status()
    if not ok:
        print(f"long_run: {reason}")
        return 2
    import cupy

    from mla_cupy import flash_mla_with_kvcache, get_mla_metadata, interface

    rng = np.random.default_rng(args.seed)
    inputs = Inputs(cupy, rng, args.max_batch)
    check = Check(cupy, args.seed)
    streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(STREAMS)]
    # Every step's choices, drawn up front so the loop does no host-side random work.
    batch = rng.integers(1, args.max_batch + 1, size=args.calls)
    s_q = rng.choice(S_Q, size=args.calls)
    h_q = rng.choice(H_Q, size=args.calls)
    dtype = rng.integers(0, len(DTYPES), size=args.calls)
    kset = rng.integers(0, len(inputs.seqlens), size=args.calls)
    print(f"long_run: {args.calls} steps, batch 1..{args.max_batch}, s_q {S_Q}, h_q {H_Q}, {DTYPES}, "
          f"seqlens 0..{MAX_SEQLEN}, page {PAGE}, {STREAMS} streams; a row every {every} steps", flush=True)
    print(HEADER, flush=True)

    # The inputs were made on the legacy default stream, which the non-blocking streams below do
    # not wait for.
    cupy.cuda.Device().synchronize()
    samples, failures = [], 0
    t0 = last_t = time.perf_counter()
    last_calls = 0
    for i in range(args.calls):
        n, sq, h = int(batch[i]), int(s_q[i]), int(h_q[i])
        q, kc, bt, sl = inputs.step(n, sq, h, DTYPES[dtype[i]], kset[i])
        with streams[i % STREAMS]:
            meta = get_mla_metadata(sl, sq * h, 1)
            out, lse = flash_mla_with_kvcache(q, kc, bt, sl, DV, *meta, causal=True)
        del q, kc, bt, sl, meta, out, lse
        if (i + 1) % every == 0 or i + 1 == args.calls:
            cupy.cuda.Device().synchronize()
            report = check()
            failures += not report.passed
            now = time.perf_counter()
            s = sample(cupy, interface, i + 1, now - t0)
            samples.append(s)
            print(row(s, (i + 1 - last_calls) / (now - last_t), "ok" if report.passed else "FAILED"), flush=True)
            if not report.passed:
                print(report, flush=True)
            last_t, last_calls = time.perf_counter(), i + 1

    stayed, text = flat(samples, args.calls, args.tolerance_mib)
    print(f"memory stayed flat: {'yes' if stayed else 'NO'} ({text}); "
          f"{failures} of {len(samples)} reference checks failed", flush=True)
    return 0 if stayed and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
