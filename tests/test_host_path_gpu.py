"""GPU lane of the lean per-call host path: after a signature's first (validated) call, CuPy
arrays and torch tensors take the fast path (pointers read from the framework's objects,
results allocated by it, its current stream); its results must match the reference and the
first call's bit for bit, a wrong pointer, stride or stream would show here.
"""

import os

import numpy as np
import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import cupy  # noqa: E402

from mla_cupy import flash_mla_with_kvcache, get_mla_metadata, interface  # noqa: E402
from mla_cupy.reference import flash_mla_with_kvcache_reference  # noqa: E402
from mla_cupy.testing import assert_mla_close, make_decode_inputs  # noqa: E402

pytestmark = pytest.mark.gpu

B, S_Q, H_Q, D, DV, PAGE, LAYERS = 6, 2, 16, 576, 512, 64, 3


def _layers(seed=0):
    """Host inputs of LAYERS layers sharing block table and seqlens, each its own q and cache."""
    base = make_decode_inputs(B, S_Q, H_Q, 1, head_dim=D, head_dim_v=DV, page_block_size=PAGE,
                              mean_seqlen=700, varlen=True, seed=seed)
    rng = np.random.default_rng(seed + 1)
    layers = [(base.q, base.k_cache)]
    for _ in range(LAYERS - 1):
        q = (0.1 * rng.standard_normal(base.q.shape)).astype(base.q.dtype)
        kc = base.k_cache.copy()
        kc[np.isfinite(kc.astype(np.float32))] = (0.1 * rng.standard_normal(
            int(np.isfinite(kc.astype(np.float32)).sum()))).astype(base.q.dtype)
        layers.append((q, kc))
    return base, layers


def _reference(base, layers):
    return [flash_mla_with_kvcache_reference(q, kc, base.block_table, base.cache_seqlens, DV, causal=True)
            for q, kc in layers]


def _bits(x):
    x = cupy.asarray(x)
    return cupy.asnumpy(x.view(cupy.uint16 if x.itemsize == 2 else cupy.uint32))


def _fast_entries():
    return len(interface._fast_plans), len(interface._fast_metadata)


def test_cupy_fast_path_matches_reference_and_first_call():
    base, layers = _layers(1)
    refs = _reference(base, layers)
    bt, sl = cupy.asarray(base.block_table), cupy.asarray(base.cache_seqlens)
    dev = [(cupy.asarray(q), cupy.asarray(kc)) for q, kc in layers]
    first = None
    for step in range(4):  # 0: full path; 1: full path, fast entry made; 2, 3: fast path
        meta = get_mla_metadata(sl, S_Q * H_Q, 1)
        assert isinstance(meta[0], cupy.ndarray) and meta[0].shape[1] == 8
        results = [flash_mla_with_kvcache(q, kc, bt, sl, DV, *meta, causal=True) for q, kc in dev]
        cupy.cuda.Device().synchronize()
        if first is None:
            first = [(_bits(o), _bits(lse)) for o, lse in results]
        for layer, ((out, lse), (out_ref, lse_ref)) in enumerate(zip(results, refs)):
            assert isinstance(out, cupy.ndarray) and out.shape == (B, S_Q, H_Q, DV) and out.dtype == dev[0][0].dtype
            assert lse.shape == (B, H_Q, S_Q) and lse.dtype == cupy.float32
            assert_mla_close(out, lse, out_ref, lse_ref, std=base.std, msg=f"step {step} layer {layer}")
            np.testing.assert_array_equal(_bits(out), first[layer][0])
            np.testing.assert_array_equal(_bits(lse), first[layer][1])
    assert all(n > 0 for n in _fast_entries())


def test_cupy_fast_path_with_out_buffers_and_streams():
    base, layers = _layers(2)
    (out_ref, lse_ref), = _reference(base, layers[:1])
    q, kc = (cupy.asarray(x) for x in layers[0])
    bt, sl = cupy.asarray(base.block_table), cupy.asarray(base.cache_seqlens)
    for i in range(3):
        stream = cupy.cuda.Stream(non_blocking=True)  # a new stream: its own workspace
        with stream:
            meta = get_mla_metadata(sl, S_Q * H_Q, 1)
            out = cupy.full((B, S_Q, H_Q, DV), np.nan, dtype=q.dtype)
            lse = cupy.full((B, H_Q, S_Q), np.nan, dtype=cupy.float32)
            got_out, got_lse = flash_mla_with_kvcache(q, kc, bt, sl, DV, *meta, causal=True, out=out, lse=lse)
            assert got_out is out and got_lse is lse
            new_out, new_lse = flash_mla_with_kvcache(q, kc, bt, sl, DV, *meta, causal=True)
        stream.synchronize()
        assert_mla_close(out, lse, out_ref, lse_ref, std=base.std, msg=f"out= buffers, round {i}")
        assert_mla_close(new_out, new_lse, out_ref, lse_ref, std=base.std, msg=f"allocated, round {i}")


def test_cupy_fast_path_results_outlive_each_other():
    # The fast path's two CuPy results share one allocation: either one, kept alone while the
    # pool hands out and overwrites memory, must keep its values, and the two must not overlap.
    base, layers = _layers(5)
    (out_ref, lse_ref), = _reference(base, layers[:1])
    q, kc = (cupy.asarray(x) for x in layers[0])
    bt, sl = cupy.asarray(base.block_table), cupy.asarray(base.cache_seqlens)
    meta = get_mla_metadata(sl, S_Q * H_Q, 1)
    kept = []
    for i in range(6):  # from the third call on, the fast path
        out, lse = flash_mla_with_kvcache(q, kc, bt, sl, DV, *meta, causal=True)
        assert out.data.ptr + out.nbytes <= lse.data.ptr or lse.data.ptr + lse.nbytes <= out.data.ptr
        assert out.flags.c_contiguous and lse.flags.c_contiguous
        if i >= 2:  # the fast path: one allocation, lse 256-byte aligned in it
            assert out.data.mem is lse.data.mem and lse.data.ptr % 256 == 0
        kept.append(lse if i % 2 else out)
        del out, lse
        scratch = [cupy.full(n, np.nan, dtype=cupy.float32) for n in (B * S_Q * H_Q * DV, B * H_Q * S_Q, 1 << 20)]
        del scratch
    cupy.cuda.Device().synchronize()
    for i, x in enumerate(kept):
        if i % 2:
            np.testing.assert_allclose(cupy.asnumpy(x), lse_ref, rtol=8.01 / 65536, atol=1e-5 * (base.std / 0.1) ** 2,
                                       err_msg=f"lse of call {i}")  # compare_mla's lse tolerance
        else:
            assert_mla_close(x, cupy.asarray(lse_ref), out_ref, lse_ref, std=base.std, msg=f"out of call {i}")


def test_cupy_fast_path_metadata_results_outlive_each_other():
    # get_mla_metadata's fast path also returns its two results from one allocation: either
    # one, kept alone while the pool hands out and overwrites memory, keeps the schedule.
    base = make_decode_inputs(B, S_Q, H_Q, 1, head_dim=D, head_dim_v=DV, page_block_size=PAGE,
                              mean_seqlen=700, varlen=True, seed=6)
    sl = cupy.asarray(base.cache_seqlens)
    want = [cupy.asnumpy(x) for x in get_mla_metadata(sl, S_Q * H_Q, 1)]
    kept = []
    for i in range(6):  # from the third call on, the fast path
        sched, splits = get_mla_metadata(sl, S_Q * H_Q, 1)
        if i >= 2:
            assert sched.data.mem is splits.data.mem and splits.data.ptr % 256 == 0
            assert sched.data.ptr + sched.nbytes <= splits.data.ptr
        kept.append((i % 2, splits if i % 2 else sched))
        del sched, splits
        scratch = [cupy.full(n, -7, dtype=cupy.int32) for n in (1 << 12, 1 << 20)]
        del scratch
    cupy.cuda.Device().synchronize()
    for i, (which, x) in enumerate(kept):
        np.testing.assert_array_equal(cupy.asnumpy(x), want[which], err_msg=f"result {which} of call {i}")


def test_fast_path_still_refuses_what_validation_refuses():
    base, layers = _layers(3)
    q, kc = (cupy.asarray(x) for x in layers[0])
    bt, sl = cupy.asarray(base.block_table), cupy.asarray(base.cache_seqlens)
    meta = get_mla_metadata(sl, S_Q * H_Q, 1)
    for _ in range(3):
        flash_mla_with_kvcache(q, kc, bt, sl, DV, *meta, causal=True)
    # Same shape, strides and dtype, but a data pointer 8 bytes off 16-byte alignment.
    raw = cupy.empty(q.size * 2 + 8, dtype=cupy.uint8)
    shifted = cupy.ndarray(q.shape, dtype=q.dtype, memptr=raw.data + 8)
    shifted[...] = q
    for _ in range(2):
        with pytest.raises(ValueError, match="q: expected a data pointer aligned"):
            flash_mla_with_kvcache(shifted, kc, bt, sl, DV, *meta, causal=True)
    with pytest.raises(ValueError, match="num_splits"):
        flash_mla_with_kvcache(q, kc, bt, sl, DV, meta[0], meta[1][:-1], causal=True)
    with pytest.raises(TypeError, match="softmax_scale"):
        flash_mla_with_kvcache(q, kc, bt, sl, DV, *meta, softmax_scale="x", causal=True)


def test_cupy_graph_of_several_layers_replays_the_fast_path():
    base, layers = _layers(4)
    refs = _reference(base, layers)
    bt, sl = cupy.asarray(base.block_table), cupy.asarray(base.cache_seqlens)
    dev = [(cupy.asarray(q), cupy.asarray(kc)) for q, kc in layers]
    outs = [cupy.empty((B, S_Q, H_Q, DV), dtype=dev[0][0].dtype) for _ in layers]
    lses = [cupy.empty((B, H_Q, S_Q), dtype=cupy.float32) for _ in layers]

    def step():
        meta = get_mla_metadata(sl, S_Q * H_Q, 1)
        for (q, kc), out, lse in zip(dev, outs, lses):
            flash_mla_with_kvcache(q, kc, bt, sl, DV, *meta, causal=True, out=out, lse=lse)
        return meta

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(3):  # full path, then the fast path (kernels loaded, workspace made)
            step()
        stream.begin_capture()
        kept = step()  # noqa: F841 - the graph writes into these
        graph = stream.end_capture()
        for out, lse in zip(outs, lses):
            out.view(cupy.uint16).fill(0xFFFF)
            lse.fill(np.nan)
        graph.launch(stream)
    stream.synchronize()
    for layer, ((out_ref, lse_ref), out, lse) in enumerate(zip(refs, outs, lses)):
        assert_mla_close(out, lse, out_ref, lse_ref, std=base.std, msg=f"graph replay layer {layer}")


@pytest.fixture
def torch_cuda():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA device")
    return torch


def _torch_inputs(torch, base, layers):
    def t(x):
        if x.dtype.name in ("bfloat16", "float16"):
            return torch.from_numpy(x.view(np.uint16).copy()).cuda().view(getattr(torch, x.dtype.name))
        return torch.from_numpy(np.ascontiguousarray(x)).cuda()
    return t(base.block_table), t(base.cache_seqlens), [(t(q), t(kc)) for q, kc in layers]


def test_torch_fast_path_matches_reference(torch_cuda):
    torch = torch_cuda
    base, layers = _layers(5)
    refs = _reference(base, layers)
    bt, sl, dev = _torch_inputs(torch, base, layers)
    side = torch.cuda.Stream()
    for step in range(4):
        stream = torch.cuda.current_stream() if step % 2 else side
        with torch.cuda.stream(stream):
            torch.cuda._sleep(1_000_000)  # queued work: a call on another stream would race it
            q_first = dev[0][0].clone()  # produced on this stream just before the call
            meta = get_mla_metadata(sl, S_Q * H_Q, 1)
            assert isinstance(meta[0], torch.Tensor) and meta[0].device == q_first.device
            results = [flash_mla_with_kvcache(q_first if i == 0 else q, kc, bt, sl, DV, *meta, causal=True)
                       for i, (q, kc) in enumerate(dev)]
        torch.cuda.synchronize()
        for layer, ((out, lse), (out_ref, lse_ref)) in enumerate(zip(results, refs)):
            assert isinstance(out, torch.Tensor) and out.dtype == dev[0][0].dtype and out.is_cuda
            assert tuple(out.shape) == (B, S_Q, H_Q, DV) and lse.dtype == torch.float32
            assert_mla_close(cupy.from_dlpack(out), cupy.from_dlpack(lse), out_ref, lse_ref, std=base.std,
                             msg=f"torch step {step} layer {layer}")


def test_torch_fast_path_out_buffers_and_strided_q(torch_cuda):
    torch = torch_cuda
    base, layers = _layers(6)
    (out_ref, lse_ref), = _reference(base, layers[:1])
    bt, sl, dev = _torch_inputs(torch, base, layers[:1])
    q, kc = dev[0]
    wide = torch.zeros((B, S_Q, H_Q, D + 64), dtype=q.dtype, device=q.device)
    wide[..., :D] = q
    q_strided = wide[..., :D]  # rows of D + 64 elements: strides the key must see
    meta = get_mla_metadata(sl, S_Q * H_Q, 1)
    for _ in range(3):
        out = torch.full((B, S_Q, H_Q, DV), float("nan"), dtype=q.dtype, device=q.device)
        lse = torch.full((B, H_Q, S_Q), float("nan"), dtype=torch.float32, device=q.device)
        got = flash_mla_with_kvcache(q_strided, kc, bt, sl, DV, *meta, causal=True, out=out, lse=lse)
        dense = flash_mla_with_kvcache(q, kc, bt, sl, DV, *meta, causal=True)
        torch.cuda.synchronize()
        assert got[0].data_ptr() == out.data_ptr() and got[1].data_ptr() == lse.data_ptr()
        for o, lse_ in (got, dense):
            assert_mla_close(cupy.from_dlpack(o), cupy.from_dlpack(lse_), out_ref, lse_ref, std=base.std)


def test_torch_graph_of_several_layers(torch_cuda):
    torch = torch_cuda
    base, layers = _layers(7)
    refs = _reference(base, layers)
    bt, sl, dev = _torch_inputs(torch, base, layers)
    outs = [torch.empty((B, S_Q, H_Q, DV), dtype=dev[0][0].dtype, device="cuda") for _ in layers]
    lses = [torch.empty((B, H_Q, S_Q), dtype=torch.float32, device="cuda") for _ in layers]

    def step():
        meta = get_mla_metadata(sl, S_Q * H_Q, 1)
        for (q, kc), out, lse in zip(dev, outs, lses):
            flash_mla_with_kvcache(q, kc, bt, sl, DV, *meta, causal=True, out=out, lse=lse)
        return meta

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # warm-up on the capture stream: kernels loaded, workspace made
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        kept = step()  # noqa: F841
    for out, lse in zip(outs, lses):
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for layer, ((out_ref, lse_ref), out, lse) in enumerate(zip(refs, outs, lses)):
        assert_mla_close(cupy.from_dlpack(out), cupy.from_dlpack(lse), out_ref, lse_ref, std=base.std,
                         msg=f"torch graph replay layer {layer}")


def test_jax_fast_path_matches_reference_and_waits_for_pending_inputs(jax_gpu):
    jax, device = jax_gpu
    import jax.numpy as jnp

    base, layers = _layers(8)
    refs = _reference(base, layers)
    bt, sl = (jax.device_put(x, device) for x in (base.block_table, base.cache_seqlens))
    dev = [tuple(jax.device_put(x, device) for x in layer) for layer in layers]
    a = jax.device_put(jnp.full((2048, 2048), 1.0 / 2048, jnp.float32), device)

    @jax.jit
    def late(q, a):  # q again, ~30 ms of matmuls later: still being written when the call comes
        busy = jax.lax.fori_loop(0, 100, lambda i, y: y @ a, a)
        return (q.astype(jnp.float32) + 0.0 * busy[0, 0]).astype(q.dtype)

    late(dev[0][0], a).block_until_ready()
    first = None
    for step in range(4):  # 0: full path; 1: full path, fast entries made; 2, 3: fast path
        q_late = late(dev[0][0], a)
        meta = get_mla_metadata(sl, S_Q * H_Q, 1)
        assert isinstance(meta[0], jax.Array) and meta[0].shape[1] == 8
        if step >= 2:
            assert not q_late.is_ready()  # the call's stream must wait for it
        results = [flash_mla_with_kvcache(q_late if i == 0 else q, kc, bt, sl, DV, *meta, causal=True)
                   for i, (q, kc) in enumerate(dev)]
        jax.block_until_ready(results)
        if first is None:
            first = [(_bits(cupy.from_dlpack(o)), _bits(cupy.from_dlpack(lse))) for o, lse in results]
        for layer, ((out, lse), (out_ref, lse_ref)) in enumerate(zip(results, refs)):
            assert isinstance(out, jax.Array) and out.dtype == dev[0][0].dtype and out.shape == (B, S_Q, H_Q, DV)
            assert isinstance(lse, jax.Array) and lse.dtype == jnp.float32 and lse.shape == (B, H_Q, S_Q)
            out_c, lse_c = cupy.from_dlpack(out), cupy.from_dlpack(lse)
            assert_mla_close(out_c, lse_c, out_ref, lse_ref, std=base.std, msg=f"jax step {step} layer {layer}")
            np.testing.assert_array_equal(_bits(out_c), first[layer][0])
            np.testing.assert_array_equal(_bits(lse_c), first[layer][1])
            np.testing.assert_array_equal(np.asarray(lse), cupy.asnumpy(lse_c))  # as JAX reads it
    assert any(isinstance(e, interface._FastDecodeJax) for e in interface._fast_plans.values())
    assert any(isinstance(e, interface._FastMetadataJax) for e in interface._fast_metadata.values())
