"""Host-side cost of one decode call: Python wall time per call, plain loop, no synchronisation.

Measures ``flash_mla_with_kvcache`` with CuPy arrays, with torch tensors and with JAX arrays
(each when the framework can be imported and sees the GPU), the same call jitted through
``mla_cupy.jax``, ``get_mla_metadata``, and, when the FlashMLA peer is present (``--peer``,
default .peers/flashmla), FlashMLA's own call with torch tensors, all at b = 128, s_q 1, h_q 16,
and prints a table against the targets.

Usage (repo root, GPU machine): PYTHONPATH=. python3 scripts/host_profile.py [--profile] [--breakdown]
(``--breakdown`` also times each step of the fast path on its own: signature, key, results,
workspace, launches, and the driver call alone).
"""
import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX shares the GPU

import numpy as np  # noqa: E402

B, S_Q, H_Q, H_KV, D, DV, PAGE, SEQLEN = 128, 1, 16, 1, 576, 512, 64, 512
TARGETS_US = {"cupy": 20.0, "torch": 30.0, "jax": 30.0, "metadata": 20.0}


def host_us(fn, calls, rounds, sync):
    """Median over ``rounds`` of the mean wall time of ``calls`` back-to-back calls (µs).

    No synchronisation inside a round; ``sync`` waits for the GPU between rounds so that a
    round never blocks on a full launch queue left by the one before."""
    for _ in range(20):
        fn()
    sync()
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_round.append((time.perf_counter() - t0) / calls * 1e6)
        sync()
    return statistics.median(per_round), min(per_round)


def _inputs_np():
    rng = np.random.default_rng(0)
    nb = B * SEQLEN // PAGE
    q = (rng.standard_normal((B, S_Q, H_Q, D)) * 0.1).astype(np.float32)
    kc = (rng.standard_normal((nb, PAGE, H_KV, D)) * 0.1).astype(np.float32)
    bt = rng.permutation(nb).astype(np.int32).reshape(B, -1)
    sl = np.full(B, SEQLEN, dtype=np.int32)
    return q, kc, bt, sl


def case_cupy(mla, arrays):
    import cupy
    from mla_cupy.bench import _to_bf16
    q, kc, bt, sl = arrays
    q, kc = (_to_bf16(cupy, cupy.asarray(x)) for x in (q, kc))
    bt, sl = cupy.asarray(bt), cupy.asarray(sl)
    sched, ns = mla.get_mla_metadata(sl, S_Q * H_Q // H_KV, H_KV)

    def call():
        return mla.flash_mla_with_kvcache(q, kc, bt, sl, DV, sched, ns, causal=True)

    def meta():
        return mla.get_mla_metadata(sl, S_Q * H_Q // H_KV, H_KV)
    sync = cupy.cuda.Device().synchronize
    return call, meta, sync


def case_torch(mla, arrays):
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no GPU")
    q, kc, bt, sl = (torch.from_numpy(x).cuda() for x in arrays)
    q, kc = q.to(torch.bfloat16), kc.to(torch.bfloat16)
    sched, ns = mla.get_mla_metadata(sl, S_Q * H_Q // H_KV, H_KV)

    def call():
        return mla.flash_mla_with_kvcache(q, kc, bt, sl, DV, sched, ns, causal=True)
    return call, (q, kc, bt, sl), torch.cuda.synchronize


def case_jax(mla, arrays, jit=False):
    """JAX arrays through the eager call, or (`jit`) the same call through ``mla_cupy.jax``
    inside ``jax.jit`` (the portable kernel): there the host cost is JAX's dispatch of the
    jitted step, with no mla_cupy Python per call."""
    import jax
    import jax.numpy as jnp
    dev = jax.devices("gpu")[0]
    q, kc, bt, sl = (jax.device_put(x, dev) for x in arrays)
    q, kc = q.astype(jnp.bfloat16), kc.astype(jnp.bfloat16)
    api = mla
    if jit:
        import mla_cupy.jax as api
    sched, ns = api.get_mla_metadata(sl, S_Q * H_Q // H_KV, H_KV)

    def step(q, kc, bt, sl, sched, ns):
        return api.flash_mla_with_kvcache(q, kc, bt, sl, DV, sched, ns, causal=True)
    if jit:
        step = jax.jit(step)
    last = []

    def call():
        out = step(q, kc, bt, sl, sched, ns)
        last[:] = [out]
        return out

    def sync():
        if last:
            jax.block_until_ready(last[0])
    return call, sync


def case_flashmla(path, torch_inputs):
    import torch
    if path not in sys.path:
        sys.path.insert(0, path)
    import flash_mla_interface as fm
    q, kc, bt, sl = torch_inputs
    sched, _ = fm.get_mla_metadata()

    def call():
        return fm.flash_mla_with_kvcache(q, kc, bt, sl, DV, sched, None,
                                         softmax_scale=D ** -0.5, causal=True)
    return call, torch.cuda.synchronize


def _short(exc, limit=90):
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def format_rows(rows):
    """rows: (what, median µs or None, min µs or None, target µs or None, note)."""
    head = f"{'call':<46} {'µs/call':>8} {'min':>8} {'target':>7} {'met':>4}"
    lines = [head, "-" * len(head)]
    for what, med, low, target, note in rows:
        def num(v, spec):
            return "-" if v is None else format(v, spec)
        met = "-" if med is None or target is None else ("yes" if med <= target else "no")
        line = (f"{what:<46} {num(med, '8.1f'):>8} {num(low, '8.1f'):>8} "
                f"{num(target, '7.0f') if target else '-':>7} {met:>4}")
        if note:
            line += "  " + note
        lines.append(line)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200, help="calls per round (default 200)")
    p.add_argument("--rounds", type=int, default=7, help="rounds, median taken (default 7)")
    p.add_argument("--peer", default=os.path.join(".peers", "flashmla"),
                   help="FlashMLA peer folder (default %(default)s)")
    p.add_argument("--profile", action="store_true",
                   help="also print a cProfile of the CuPy call path")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each step of the fast path (CuPy and torch) on its own")
    args = p.parse_args(argv)
    import mla_cupy

    arrays = _inputs_np()
    shape = f"b{B} s_q{S_Q} h{H_Q}"
    rows = []

    def measure(what, target, make):
        try:
            fn, sync = make()
            med, low = host_us(fn, args.calls, args.rounds, sync)
            rows.append((what, med, low, target, ""))
        except ImportError as exc:
            rows.append((what, None, None, target, f"not importable ({_short(exc, 60)})"))
        except Exception as exc:
            rows.append((what, None, None, target, _short(exc)))

    cupy_case = []

    def make_cupy():
        cupy_case[:] = case_cupy(mla_cupy, arrays)
        return cupy_case[0], cupy_case[2]
    measure(f"flash_mla_with_kvcache, CuPy ({shape})", TARGETS_US["cupy"], make_cupy)
    if cupy_case:
        measure(f"get_mla_metadata, CuPy ({shape})", TARGETS_US["metadata"],
                lambda: (cupy_case[1], cupy_case[2]))
    else:
        rows.append((f"get_mla_metadata, CuPy ({shape})", None, None, TARGETS_US["metadata"],
                     "needs the CuPy case"))

    torch_case = []

    def make_torch():
        call, inputs, sync = case_torch(mla_cupy, arrays)
        torch_case[:] = [inputs]
        return call, sync
    measure(f"flash_mla_with_kvcache, torch ({shape})", TARGETS_US["torch"], make_torch)
    measure(f"flash_mla_with_kvcache, JAX ({shape})", TARGETS_US["jax"],
            lambda: case_jax(mla_cupy, arrays))
    measure(f"mla_cupy.jax in jax.jit ({shape})", TARGETS_US["jax"], lambda: case_jax(mla_cupy, arrays, jit=True))
    if os.path.isfile(os.path.join(args.peer, "flash_mla_interface.py")):
        if torch_case:
            measure(f"FlashMLA, torch ({shape}; reference)", None,
                    lambda: case_flashmla(args.peer, torch_case[0]))
        else:
            rows.append((f"FlashMLA, torch ({shape}; reference)", None, None, None,
                         "needs torch"))
    else:
        rows.append((f"FlashMLA, torch ({shape}; reference)", None, None, None,
                     f"peer not found in {args.peer}"))

    print(f"host time per call: plain loop of {args.calls} calls without synchronisation, "
          f"median of {args.rounds} rounds")
    for line in format_rows(rows):
        print(line)

    if args.profile and cupy_case:
        call, _meta, sync = cupy_case
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            call()
        prof.disable()
        sync()
        print()
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    if args.breakdown:
        measured = {what for what, med, *_ in rows if med is not None}
        if cupy_case and f"flash_mla_with_kvcache, CuPy ({shape})" in measured:
            print()
            print_breakdown("CuPy", cupy_case[0], cupy_case[2], args)
        if torch_case and f"flash_mla_with_kvcache, torch ({shape})" in measured:
            call, _inputs, sync = case_torch(mla_cupy, arrays)
            print()
            print_breakdown("torch", call, sync, args)
    return 0


def breakdown_steps(call):
    """(name, function) of each step of a fast-path call, from the entry `call` leaves in the
    fast-path cache: what a call costs, step by step. None when the call takes no fast path
    (e.g. with MLA_CUPY_VALIDATE=1)."""
    from mla_cupy import _launch, interface

    call()
    arrays = _fast_arrays(call)
    sig = interface._signature(arrays)
    if sig is None:
        return None

    def fast_key():  # as flash_mla_with_kvcache builds it for the call's arguments
        return (sig[1], int, DV, type(None), None, bool, True, bool, False, True, interface._kind())

    entry = interface._cached(interface._fast_plans, fast_key())
    if entry is None:
        return None
    stream = entry.stream(entry.framework, entry.device_id)
    plan, launch = entry.plan, entry.plan.launch
    o_accum, lse_accum, _held = interface._workspace(entry.device_id, stream, plan.ws_rows, plan.ws_cols)
    results = entry.new_results()  # the launches below write them: the closures keep them alive
    out_ptr, lse_ptr = results[1], results[3]
    pointers = sig[2]
    inputs = (*pointers[:6], out_ptr, lse_ptr, o_accum, lse_accum)
    steps = [
        ("whole call", call),
        ("signature of the 8 arguments", lambda: interface._signature(arrays)),
        ("fast-path key and lookup", lambda: interface._cached(interface._fast_plans, fast_key())),
        ("current stream", lambda: entry.stream(entry.framework, entry.device_id)),
        ("two result arrays", entry.new_results),
        ("capture check", lambda: interface._capturing(stream)),
        ("workspace lookup", lambda: interface._workspace(entry.device_id, stream, plan.ws_rows, plan.ws_cols)),
        ("both launches", lambda: (results, launch.launch(stream, pointers[:6], out_ptr, lse_ptr, o_accum,
                                                          lse_accum))),
    ]
    decode = getattr(launch, "decode", None)
    if isinstance(decode, _launch.Kernel) and decode._driver is not None:
        extra = (launch._kv_map(pointers[1]),) if hasattr(launch, "_kv_map") else ()
        steps.append(("decode launch", lambda: (results, decode(stream, inputs, extra))))
        steps.append(("cuLaunchKernelEx alone (decode)", lambda: (results, decode._driver(
            decode._config_address, decode._fn_ptr, decode._argv_address, None))))
    return steps


def _fast_arrays(call):
    """The eight array arguments of `call` (a closure over q, kc, bt, sl, sched, ns) as the fast
    path reads them."""
    cells = {name: cell.cell_contents for name, cell in zip(call.__code__.co_freevars, call.__closure__)}
    return (cells["q"], cells["kc"], cells["bt"], cells["sl"], cells["sched"], cells["ns"], None, None)


def print_breakdown(name, call, sync, args):
    steps = breakdown_steps(call)
    if steps is None:
        print(f"{name} call: no fast-path entry to break down (is MLA_CUPY_VALIDATE set?)")
        return
    print(f"{name} call, step by step (µs per call, plain loop, median of {args.rounds} rounds):")
    for what, fn in steps:
        med, _low = host_us(fn, args.calls, args.rounds, sync)
        print(f"  {what:<34} {med:8.2f}")


if __name__ == "__main__":
    sys.exit(main())
