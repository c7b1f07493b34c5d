"""What mla_cupy keeps between calls, without a GPU: the signature caches are bounded and drop
the least recently used entry, and the split-KV workspace keeps an outgrown buffer only when a
CUDA graph may use it.

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
    state.allocations, state.capturing = [], set()
    monkeypatch.setattr(interface, "_workspaces", {})
    monkeypatch.setattr(interface, "_retired", [])

    def allocate(device_id, stream, n):
        buffer = FakeBuffer(n)
        state.allocations.append((device_id, stream, n))
        return buffer

    monkeypatch.setattr(interface, "_allocate", allocate)
    monkeypatch.setattr(interface, "_capturing", lambda stream: stream in state.capturing)
    return state


def _buffer(device_id, stream):
    return interface._workspaces[(device_id, stream)].buffer


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


def test_buffer_handed_out_during_a_capture_is_kept(fake_gpu):
    interface._workspace(0, 7, 10, 512)
    fake_gpu.capturing.add(7)
    pointers = interface._workspace(0, 7, 10, 512)  # captured into a graph
    captured = _buffer(0, 7)
    assert interface._workspaces[(0, 7)].captured
    fake_gpu.capturing.clear()
    interface._workspace(0, 7, 1000, 512)  # eager, outgrows it
    assert _buffer(0, 7) is not captured
    assert interface._retired == [captured] and captured.data.ptr == pointers[0]
    # The new buffer has not been seen by a capture: outgrowing it frees it.
    interface._workspace(0, 7, 10000, 512)
    assert interface._retired == [captured]


def test_buffer_outgrown_during_a_capture_is_kept(fake_gpu):
    interface._workspace(0, 7, 10, 512)
    eager = _buffer(0, 7)
    fake_gpu.capturing.add(7)
    interface._workspace(0, 7, 100, 512)
    assert interface._retired == [eager]
    assert interface._workspaces[(0, 7)].captured


def test_streams_past_the_limit_drop_the_least_recently_grown(fake_gpu, monkeypatch):
    monkeypatch.setattr(interface, "_MAX_WORKSPACES", 3)
    fake_gpu.capturing.add(1)
    interface._workspace(0, 1, 10, 512)  # captured: never dropped
    fake_gpu.capturing.clear()
    for stream in (2, 3, 4, 5):
        interface._workspace(0, stream, 10, 512)
    assert list(interface._workspaces) == [(0, 1), (0, 4), (0, 5)]
    interface._workspace(0, 4, 100, 512)  # regrown: now the most recent
    interface._workspace(0, 6, 10, 512)
    assert list(interface._workspaces) == [(0, 1), (0, 4), (0, 6)]
    assert interface._retired == []


def test_capture_on_a_dropped_buffer_keeps_it(fake_gpu, monkeypatch):
    # Another thread drops the stream's entry between this call's lookup and its capture query:
    # the buffer the graph gets must be kept all the same.
    interface._workspace(0, 7, 10, 512)
    buffer = _buffer(0, 7)

    def capturing_after_a_drop(stream):
        interface._drop((0, stream), keep=False)
        return True

    monkeypatch.setattr(interface, "_capturing", capturing_after_a_drop)
    pointers = interface._workspace(0, 7, 10, 512)
    assert pointers[0] == buffer.data.ptr and interface._retired == [buffer]


def test_capture_query_errors_count_as_capturing(monkeypatch):
    def refuses(stream):
        raise RuntimeError("cudaErrorStreamCaptureImplicit")

    monkeypatch.setattr(interface, "_is_capturing", refuses)
    assert interface._capturing(0) is True
    monkeypatch.setattr(interface, "_is_capturing", lambda stream: False)
    assert interface._capturing(0) is False
