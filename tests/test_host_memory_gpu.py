"""GPU lane of what mla_cupy keeps between calls (tests/test_host_memory.py has the rules
without a GPU): the split-KV workspace stops growing once it fits the largest shape, an outgrown
buffer goes back to CuPy's pool, a CUDA graph's calls get a buffer of their own (kept), a graph
replayed after the stream's eager buffer was outgrown still gives the right answer, and a graph
replayed on another stream while eager calls run on its capture stream does not mix their
partial results.
"""

import numpy as np
import pytest

import cupy

from mla_cupy import flash_mla_with_kvcache, get_mla_metadata, interface
from mla_cupy.reference import flash_mla_with_kvcache_reference
from mla_cupy.testing import assert_mla_close, make_decode_inputs

pytestmark = pytest.mark.gpu

D, DV, H_Q = 576, 512, 16


def _seed():
    return int(np.random.SeedSequence().entropy % (1 << 30))


def _problem(batch, s_q, seed, mean_seqlen=600):
    inp = make_decode_inputs(batch, s_q, H_Q, 1, head_dim=D, head_dim_v=DV, page_block_size=64,
                             mean_seqlen=mean_seqlen, varlen=True, seed=seed)
    dev = tuple(cupy.asarray(x) for x in (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens))
    # The copies ran on the legacy default stream, which the tests' non-blocking streams do not
    # wait for: finish them before any kernel reads the inputs.
    cupy.cuda.Device().synchronize()
    return inp, dev


def _call(inp, dev, **kwargs):
    """One decode step on the current stream: (out, lse, schedule)."""
    q, kc, bt, sl = dev
    meta = get_mla_metadata(sl, inp.q.shape[1] * H_Q, 1)
    return (*flash_mla_with_kvcache(q, kc, bt, sl, DV, *meta, causal=True, **kwargs), meta)


def _fresh_stream():
    """A new stream, with no workspace left under its address by a destroyed one."""
    stream = cupy.cuda.Stream(non_blocking=True)
    for graph in (False, True):
        interface._drop(interface._key(cupy.cuda.runtime.getDevice(), stream.ptr, graph))
    return stream


def _check(inp, out, lse, msg):
    out_ref, lse_ref = flash_mla_with_kvcache_reference(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, DV,
                                                        causal=True)
    assert_mla_close(out, lse, out_ref, lse_ref, std=inp.std, msg=f"{msg}, seed {inp.seed}")


def _entry(stream, graph=False):
    return interface._workspaces[interface._key(cupy.cuda.runtime.getDevice(), stream.ptr, graph)]


def test_workspace_does_not_grow_across_alternating_shapes():
    seed = _seed()
    problems = [_problem(b, s_q, seed + i) for i, (b, s_q) in enumerate(((2, 1), (9, 2), (4, 1), (16, 1)))]
    pool = cupy.get_default_memory_pool()
    stream = _fresh_stream()
    with stream:
        for inp, dev in problems:  # one call of each shape: the workspace fits the largest
            out, lse, meta = _call(inp, dev)
            _check(inp, out, lse, "first round")
        del out, lse, meta
        stream.synchronize()
        entry = _entry(stream)
        buffer, retired, used = entry.buffer, len(interface._retired), pool.used_bytes()
        for i in range(200):
            inp, dev = problems[i % len(problems)]
            out, lse, meta = _call(inp, dev)
            if i >= 196:
                _check(inp, out, lse, f"call {i}")
            del out, lse, meta
            stream.synchronize()
            assert _entry(stream).buffer is buffer, f"call {i}: the workspace was reallocated"
            assert pool.used_bytes() == used, f"call {i}: CuPy pool use went from {used} to {pool.used_bytes()} bytes"
        assert len(interface._retired) == retired


def test_outgrown_workspace_goes_back_to_the_pool():
    seed = _seed()
    small, large = _problem(1, 1, seed, 100), _problem(64, 2, seed + 1, 2000)
    pool = cupy.get_default_memory_pool()
    stream = _fresh_stream()
    with stream:
        out, lse, meta = _call(*small)
        del out, lse, meta
        stream.synchronize()
        old_bytes, retired, used = _entry(stream).buffer.nbytes, len(interface._retired), pool.used_bytes()
        out, lse, meta = _call(*large)
        _check(large[0], out, lse, "after growing")
        del out, lse, meta
        stream.synchronize()
        new_bytes = _entry(stream).buffer.nbytes
        assert new_bytes > old_bytes and len(interface._retired) == retired
        grown = pool.used_bytes() - used
        assert abs(grown - (new_bytes - old_bytes)) <= 1024, \
            f"pool use grew by {grown} bytes; the workspace by {new_bytes - old_bytes}: the old buffer was kept"


def test_graph_replay_after_its_workspace_was_outgrown():
    seed = _seed()
    (inp, dev), large = _problem(3, 1, seed, 300), _problem(64, 2, seed + 1, 2000)
    out = cupy.empty((*inp.q.shape[:3], DV), dtype=dev[0].dtype)
    lse = cupy.empty((inp.q.shape[0], H_Q, 1), dtype=cupy.float32)
    stream = _fresh_stream()
    with stream:
        for _ in range(2):  # kernels loaded and the workspace made outside the capture
            _call(inp, dev, out=out, lse=lse)
        eager = _entry(stream)
        stream.begin_capture()
        kept = _call(inp, dev, out=out, lse=lse)  # the graph reads this schedule: kept to the end
        graph = stream.end_capture()
        captured = _entry(stream, graph=True)
        assert captured.captured and captured.buffer is not eager.buffer
        big_out, big_lse, _ = _call(*large)  # eager, outgrows the stream's eager buffer
        assert _entry(stream) is not eager and _entry(stream, graph=True) is captured
        # Whatever the pool hands out on this stream now must not be the captured buffer.
        junk = [cupy.full(captured.buffer.size, np.nan, dtype=cupy.float32) for _ in range(4)]
        out.fill(0)
        lse.fill(0)
        graph.launch(stream)
        stream.synchronize()
    assert all(j.data.ptr != captured.base for j in junk)
    del graph, kept
    _check(inp, out, lse, "graph replay after the workspace grew")
    _check(large[0], big_out, big_lse, "the call that grew it")


def test_graph_replayed_on_another_stream_while_eager_calls_run_on_its_capture_stream():
    # Both split their work (3 requests over every SM), so both use a workspace all the time.
    seed = _seed()
    (g_inp, g_dev), (e_inp, e_dev) = _problem(3, 1, seed, 3000), _problem(3, 1, seed + 1, 3000)
    out = cupy.empty((*g_inp.q.shape[:3], DV), dtype=g_dev[0].dtype)
    lse = cupy.empty((g_inp.q.shape[0], H_Q, 1), dtype=cupy.float32)
    capture, replay = _fresh_stream(), _fresh_stream()
    with capture:
        _call(g_inp, g_dev, out=out, lse=lse)  # kernels loaded outside the capture
        capture.begin_capture()
        kept = _call(g_inp, g_dev, out=out, lse=lse)
        graph = capture.end_capture()
        capture.synchronize()
    eager = []
    for _ in range(20):  # the graph on `replay` and eager calls on `capture`, overlapping
        graph.launch(replay)
        with capture:
            eager.append(_call(e_inp, e_dev)[:2])
    replay.synchronize()
    capture.synchronize()
    del graph, kept
    _check(g_inp, out, lse, "graph replayed on another stream")
    for e_out, e_lse in eager[-3:]:
        _check(e_inp, e_out, e_lse, "eager calls on the capture stream meanwhile")


def test_many_streams_keep_a_bounded_number_of_workspaces():
    inp, dev = _problem(2, 1, _seed(), 200)
    device = cupy.cuda.runtime.getDevice()
    streams = [_fresh_stream() for _ in range(interface._MAX_WORKSPACES + 8)]
    results = []
    for stream in streams:
        with stream:
            results.append(_call(inp, dev)[:2])
    cupy.cuda.Device().synchronize()
    for i in (0, 1, len(results) - 1):  # the first ones' workspaces were dropped after their launch
        _check(inp, *results[i], f"stream {i}")
    eager = [k for k in interface._workspaces if k[0] == device and k[-1] != "graph"]
    assert len(eager) <= interface._MAX_WORKSPACES
