"""What mla_cupy keeps between calls, without a GPU: the signature caches are bounded and drop
the least recently used entry, and the split-KV workspace gives calls captured into CUDA graphs
a buffer of their own, apart from the eager calls', and keeps an outgrown buffer only when a
graph may use it.

The workspace's allocation and the stream-capture query are replaced by stand-ins here;
tests/test_concurrency_gpu.py runs the real ones on a GPU.
"""

import collections
import gc
import threading
import weakref

import pytest

from mla_cupy import interface

pytestmark = pytest.mark.cpu


# ---- signature caches ---------------------------------------------------------------------------

def test_signature_caches_are_ordered_by_use():
    for cache in (interface._plans, interface._metadata_parts, interface._fast_plans, interface._fast_metadata):
        assert isinstance(cache, collections.OrderedDict)
    assert interface._MAX_PLANS >= 16


def test_cache_drops_the_least_recently_used_entry(monkeypatch):
    monkeypatch.setattr(interface, "_MAX_PLANS", 3)
    cache = collections.OrderedDict()
    for key in "abc":
        interface._remember(cache, key, key.upper())
    assert interface._cached(cache, "a") == "A"  # a is now the most recently used
    interface._remember(cache, "d", "D")
    assert list(cache) == ["c", "a", "d"]
    assert interface._cached(cache, "b") is None
    interface._remember(cache, "c", "C2")  # a new value for a kept key counts as a use
    interface._remember(cache, "e", "E")
    assert list(cache) == ["d", "c", "e"] and cache["c"] == "C2"


def test_cache_stays_bounded_over_many_signatures(monkeypatch):
    monkeypatch.setattr(interface, "_MAX_PLANS", 8)
    cache = collections.OrderedDict()
    hot = ("hot", 0)
    interface._remember(cache, hot, "hot plan")
    for i in range(1000):
        interface._remember(cache, ("cold", i), i)
        assert interface._cached(cache, hot) == "hot plan"  # in use every call: never dropped
        assert len(cache) <= 8
    assert hot in cache and ("cold", 999) in cache and ("cold", 0) not in cache


def test_cache_ignores_unhashable_keys():
    cache = collections.OrderedDict()
    assert interface._cached(cache, ([1],)) is None
    interface._remember(cache, ([1],), "x")
    assert not cache


# ---- split-KV workspace -------------------------------------------------------------------------

class FakeMemory:
    def __init__(self, ptr):
        self.ptr = ptr


class FakeBuffer:
    """Stands in for the fp32 CuPy array of one workspace."""

    next_ptr = 1 << 20

    def __init__(self, n):
        self.size, self.nbytes = n, 4 * n
        self.data = FakeMemory(FakeBuffer.next_ptr)
        FakeBuffer.next_ptr += 4 * n + 4096


@pytest.fixture
def fake_gpu(monkeypatch):
    """Fresh workspace state; allocations recorded, and the streams in `capturing` capture."""
    state = type("State", (), {})()
    state.allocations, state.capturing, state.relaxed = [], set(), []
    monkeypatch.setattr(interface, "_workspaces", {})
    monkeypatch.setattr(interface, "_retired", [])

    def allocate(device_id, stream, n, graph=False):
        buffer = FakeBuffer(n)
        state.allocations.append((device_id, stream, n))
        state.relaxed.append(graph)  # made in the relaxed capture mode
        return buffer

    monkeypatch.setattr(interface, "_allocate", allocate)
    monkeypatch.setattr(interface, "_capturing", lambda stream: stream in state.capturing)
    return state


def _buffer(device_id, stream, graph=False):
    return interface._workspaces[interface._key(device_id, stream, graph)].buffer


def test_pointers_and_reuse(fake_gpu):
    o_accum, lse_accum, held = interface._workspace(0, 7, 10, 512)
    buffer = _buffer(0, 7)
    assert held is buffer
    assert buffer.size >= 10 * 513 and o_accum == buffer.data.ptr and lse_accum == o_accum + 10 * 512 * 4
    # Smaller or equal needs reuse the buffer: no allocation.
    assert interface._workspace(0, 7, 4, 512) == (o_accum, o_accum + 4 * 512 * 4, buffer)
    assert interface._workspace(0, 7, 10, 512) == (o_accum, lse_accum, buffer)
    assert len(fake_gpu.allocations) == 1
    # Each (device, stream) has its own buffer.
    other = interface._workspace(1, 7, 10, 512)
    assert other[0] != o_accum and len(fake_gpu.allocations) == 2
    assert interface._workspace_bytes() == (2, 2 * buffer.nbytes, 0)


def test_per_thread_default_stream_has_a_workspace_per_thread(fake_gpu):
    # cudaStreamPerThread (address 2) is a different stream in each thread: sharing one buffer
    # between threads would let their kernels write it at the same time.
    results, both_done = {}, threading.Barrier(2)

    def call(name):
        results[name] = interface._workspace(0, interface._PER_THREAD_STREAM, 10, 512)[0]
        both_done.wait()  # both alive at once: two distinct thread identities

    threads = [threading.Thread(target=call, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"] != results["b"] and len(fake_gpu.allocations) == 2
    # An ordinary stream is one stream for every thread: one buffer.
    first = interface._workspace(0, 7, 10, 512)[0]
    other = []
    t = threading.Thread(target=lambda: other.append(interface._workspace(0, 7, 10, 512)[0]))
    t.start()
    t.join()
    assert other == [first] and len(fake_gpu.allocations) == 3


def test_outgrown_buffer_is_freed_outside_captures(fake_gpu):
    interface._workspace(0, 7, 10, 512)
    old = weakref.ref(_buffer(0, 7))
    held = interface._workspace(0, 7, 100, 512)[2]
    gc.collect()
    assert held is _buffer(0, 7)
    assert old() is None, "an outgrown buffer no capture has seen is still referenced"
    assert interface._retired == [] and _buffer(0, 7).size >= 100 * 513


def test_alternating_shapes_do_not_grow_the_workspace(fake_gpu):
    for i in range(200):
        interface._workspace(0, 7, (64, 5, 300, 17)[i % 4], (512, 256)[i % 2])
    # The first call allocates; the third outgrows it once; nothing after that.
    assert len(fake_gpu.allocations) == 2
    assert interface._retired == []


def test_captured_calls_get_a_buffer_of_their_own(fake_gpu):
    eager = interface._workspace(0, 7, 10, 512)
    fake_gpu.capturing.add(7)
    captured = interface._workspace(0, 7, 10, 512)  # into a graph
    assert captured[0] != eager[0] and captured[2] is _buffer(0, 7, graph=True)
    assert interface._workspaces[interface._key(0, 7, graph=True)].captured
    assert interface._workspace(0, 7, 4, 512)[2] is captured[2]  # a second captured call: reused
    fake_gpu.capturing.clear()
    # Eager calls on the capture stream keep using their own buffer: a replay of the graph on
    # any stream never writes it.
    assert interface._workspace(0, 7, 10, 512) == eager
    assert len(fake_gpu.allocations) == 2 and interface._retired == []
    assert fake_gpu.relaxed == [False, True]  # the capture's allocation may call cudaMalloc


def test_graph_buffer_outgrown_is_kept_and_eager_one_freed(fake_gpu):
    interface._workspace(0, 7, 10, 512)
    eager = weakref.ref(_buffer(0, 7))
    fake_gpu.capturing.add(7)
    interface._workspace(0, 7, 10, 512)
    first_graph_buffer = _buffer(0, 7, graph=True)
    interface._workspace(0, 7, 100, 512)  # a later capture needs more: the first graph may still replay
    assert interface._retired == [first_graph_buffer] and _buffer(0, 7, graph=True) is not first_graph_buffer
    fake_gpu.capturing.clear()
    interface._workspace(0, 7, 1000, 512)  # eager, outgrows its own buffer: freed
    gc.collect()
    assert eager() is None and interface._retired == [first_graph_buffer]


def test_per_thread_default_stream_graph_buffers_are_per_thread(fake_gpu):
    fake_gpu.capturing.add(interface._PER_THREAD_STREAM)
    here = interface._workspace(0, interface._PER_THREAD_STREAM, 10, 512)[0]
    there = []
    t = threading.Thread(target=lambda: there.append(interface._workspace(0, interface._PER_THREAD_STREAM, 10, 512)[0]))
    t.start()
    t.join()
    assert there[0] != here and len(fake_gpu.allocations) == 2


def test_streams_past_the_limit_drop_the_least_recently_grown(fake_gpu, monkeypatch):
    monkeypatch.setattr(interface, "_MAX_WORKSPACES", 3)
    fake_gpu.capturing.add(1)
    interface._workspace(0, 1, 10, 512)  # captured: never dropped
    fake_gpu.capturing.clear()
    for stream in (2, 3, 4, 5):
        interface._workspace(0, stream, 10, 512)
    assert list(interface._workspaces) == [(0, 1, "graph"), (0, 4), (0, 5)]
    interface._workspace(0, 4, 100, 512)  # regrown: now the most recent
    interface._workspace(0, 6, 10, 512)
    assert list(interface._workspaces) == [(0, 1, "graph"), (0, 4), (0, 6)]
    assert interface._retired == []


def test_capture_query_errors_count_as_capturing(monkeypatch):
    def refuses(stream):
        raise RuntimeError("cudaErrorStreamCaptureImplicit")

    monkeypatch.setattr(interface, "_is_capturing", refuses)
    assert interface._capturing(0) is True
    monkeypatch.setattr(interface, "_is_capturing", lambda stream: False)
    assert interface._capturing(0) is False


def test_relaxed_capture_mode_sets_and_restores_the_threads_mode(monkeypatch):
    from mla_cupy import _driver

    modes = [0]  # this thread's capture mode: global

    def exchange(mode_ref):
        mode = mode_ref._obj
        mode.value, modes[0] = modes[0], mode.value
        return 0

    seen = []
    fake = type("LibCuda", (), {"cuThreadExchangeStreamCaptureMode": staticmethod(exchange)})()
    monkeypatch.setattr(_driver, "_libcuda", lambda: fake)
    with _driver.relaxed_capture_mode():
        seen.append(modes[0])
    assert seen == [_driver._CAPTURE_MODE_RELAXED] and modes == [0]
    with pytest.raises(KeyError), _driver.relaxed_capture_mode():
        raise KeyError("inside")
    assert modes == [0]  # restored when the block raises too


def test_kv_map_encodes_the_pool_and_promotes_l2_fetches_by_readers(monkeypatch):
    from mla_cupy import _driver

    calls = []

    def encode(buf, dtype, rank, ptr, dims, strides, box, elem, interleave, swizzle, promotion, oob):
        calls.append((dtype, rank, ptr.value, list(dims), list(strides), list(box), swizzle, promotion))
        return 0

    fake = type("LibCuda", (), {"cuTensorMapEncodeTiled": staticmethod(encode)})()
    monkeypatch.setattr(_driver, "_libcuda", lambda: fake)
    shape, strides = (10, 64, 1, 576), (64 * 576 * 2, 576 * 2, 576 * 2, 2)
    image = _driver.encode_kv_map(0x7000, shape, strides, "bfloat16", 64, shared_tiles=False)
    assert image.nbytes == 128
    _driver.encode_kv_map(0x7000, shape, strides, "bfloat16", 64)
    one, shared = calls
    # The pool as [num_blocks, page, h_kv, d] innermost first; a box of 64 columns x 64 tokens.
    assert one[:6] == (9, 4, 0x7000, [576, 1, 64, 10], [1152, 1152, 73728], [64, 1, 64, 1])
    assert one[6] == _driver._SWIZZLE_128B
    # One reader per tile: 128-byte L2 fetches; more than one: 256.
    assert one[7] == _driver._L2_PROMOTION_128B and shared[7] == _driver._L2_PROMOTION_256B
