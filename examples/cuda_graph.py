"""A whole decode step in one CUDA graph: the tile schedule plus several layers of attention.

mla_cupy never reads device data back to the host on the decode path and computes the
schedule on the GPU, so a decode step can be captured with CuPy's stream capture and replayed
with one launch. The rules for capture:

* capture on a non-default stream, after one eager step (the eager step compiles and loads
  the kernels, which must not happen during capture);
* pass preallocated ``out=`` / ``lse=`` buffers, and keep them, the inputs and the schedule
  arrays made during capture alive as long as the graph: replays write to those addresses;
* to run the next step, write the new values *into* the captured arrays
  (``cache_seqlens.set(host_array)``, ``q[...] = new_q``); never rebind the names to new arrays.

The replays below are compared with eager steps on the same inputs (the results must be
identical), once as captured and once after new queries and shorter sequences were written in
place; the last one is also checked against the NumPy float64 reference.

    python examples/cuda_graph.py
"""

import sys

import numpy as np

from mla_cupy.testing import gpu_status


def why_no_gpu():
    """None when CuPy sees a CUDA GPU mla_cupy supports, else the reason it does not (no CuPy,
    no NVIDIA driver or GPU, a driver too old for CuPy, a GPU older than compute capability 8.0)."""
    ok, reason = gpu_status()
    return None if ok else reason


def main():
    reason = why_no_gpu()
    if reason is not None:
        print(f"No CUDA GPU available: {reason}. Nothing to run.")
        return 0

    import cupy as cp

    from mla_cupy import flash_mla_with_kvcache, get_mla_metadata
    from mla_cupy.reference import flash_mla_with_kvcache_reference
    from mla_cupy.testing import assert_mla_close, make_decode_inputs

    b, s_q, h_q, h_kv, d, dv, page = 8, 1, 128, 1, 576, 512, 64
    num_layers = 4
    rng = np.random.default_rng()
    host = make_decode_inputs(b, s_q, h_q, h_kv, head_dim=d, head_dim_v=dv, page_block_size=page,
                              seqlens=rng.integers(256, 4097, size=b),
                              seed=int(rng.integers(2**31)))
    dtype = host.q.dtype

    def random_host(shape):
        return (0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    # Shared by all layers: the pages of every request and their lengths.
    block_table = cp.asarray(host.block_table)
    cache_seqlens = cp.asarray(host.cache_seqlens)
    # Per layer: its queries and its own KV pool (layer 0 reuses the generated one).
    qs = [cp.asarray(host.q)]
    k_caches = [cp.asarray(host.k_cache)]
    for _ in range(num_layers - 1):
        qs.append(cp.asarray(random_host(host.q.shape)))
        k_caches.append(cp.asarray(random_host(host.k_cache.shape)))
    # Preallocated results: the graph writes here on every replay.
    outs = [cp.empty((b, s_q, h_q, dv), dtype=dtype) for _ in range(num_layers)]
    lses = [cp.empty((b, h_q, s_q), dtype=cp.float32) for _ in range(num_layers)]

    def decode_step(out=None, lse=None):
        """Schedule once, then attention for every layer; returns the schedule and results."""
        tile_scheduler_metadata, num_splits = get_mla_metadata(
            cache_seqlens, s_q * h_q // h_kv, h_kv)
        results = []
        for layer in range(num_layers):
            results.append(flash_mla_with_kvcache(
                qs[layer], k_caches[layer], block_table, cache_seqlens, dv,
                tile_scheduler_metadata, num_splits, causal=True,
                out=None if out is None else out[layer], lse=None if lse is None else lse[layer]))
        return (tile_scheduler_metadata, num_splits), results

    def check_replay_matches_eager(graph, what):
        for out, lse in zip(outs, lses):  # poison: every value must come from the replay
            out.view(cp.uint16).fill(0xFFFF)  # a NaN in bfloat16 and in float16
            lse.fill(np.nan)
        graph.launch(stream)
        _, eager = decode_step()
        stream.synchronize()
        for layer, (out_e, lse_e) in enumerate(eager):
            for name, got, want in (("out", outs[layer], out_e), ("lse", lses[layer], lse_e)):
                bits = cp.uint16 if got.itemsize == 2 else cp.uint32
                if not cp.array_equal(got.view(bits), want.view(bits)):
                    diff = np.abs(cp.asnumpy(got).astype(np.float64)
                                  - cp.asnumpy(want).astype(np.float64))
                    raise AssertionError(f"{what}: layer {layer} {name} of the graph replay "
                                         f"differs from the eager step (max |diff| "
                                         f"{np.nanmax(diff):.3e}, NaNs {np.isnan(diff).sum()})")

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        decode_step(outs, lses)  # eager: compiles and loads every kernel the step needs
        stream.begin_capture()
        captured_schedule, _ = decode_step(outs, lses)  # keep: the graph writes into it
        graph = stream.end_capture()

        check_replay_matches_eager(graph, "as captured")

        # The next step: new queries in every layer, shorter sequences (still inside the
        # pages their block-table rows list). Written in place, then one launch.
        new_seqlens = np.maximum(host.cache_seqlens - rng.integers(0, 200, size=b), 1)
        cache_seqlens.set(new_seqlens.astype(np.int32))  # copies into the same memory
        for q in qs:
            q.set(random_host(q.shape))
        check_replay_matches_eager(graph, "after an in-place update")

        out_ref, lse_ref = flash_mla_with_kvcache_reference(
            cp.asnumpy(qs[0]), host.k_cache, host.block_table, new_seqlens, dv, causal=True)
        report = assert_mla_close(outs[0], lses[0], out_ref, lse_ref, std=host.std,
                                  msg="graph replay, layer 0")

        # Host time of one eager step vs one graph launch (the GPU work is the same).
        start, end = cp.cuda.Event(), cp.cuda.Event()
        timings = {}
        for label, step in (("eager step", lambda: decode_step(outs, lses)),
                            ("graph launch", lambda: graph.launch(stream))):
            step()
            start.record(stream)
            for _ in range(20):
                step()
            end.record(stream)
            end.synchronize()
            timings[label] = cp.cuda.get_elapsed_time(start, end) / 20 * 1e3

    print(f"OK: a decode step of {num_layers} layers (b={b}, h_q={h_q}, s_q={s_q}) captured in a "
          f"CUDA graph replays to the eager result, before and after an in-place update; "
          f"vs float64 reference: out max |error| {report.out_max_abs_error:.2e}; one step "
          f"takes {timings['eager step']:.0f} us eager, {timings['graph launch']:.0f} us as a "
          f"graph (CUDA events)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
