"""Interop on a GPU: real CuPy, PyTorch and JAX arrays through DLPack, stream ordering included.

Each test skips with a reason where a device or a framework is missing.
"""

import os

import numpy as np
import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX shares the GPU here

import cupy  # noqa: E402

from mla_cupy._interop import device_of, import_arrays, is_cuda_array  # noqa: E402

pytestmark = pytest.mark.gpu  # conftest.py skips these, with the reason, where no usable GPU exists

# --------------------------------------------------------------------------------------------
# With a GPU: real CuPy, PyTorch and JAX arrays.



# ~0.2 s of spinning on an H200: long enough that a missing stream wait shows. Every kernel the
# ordering tests use is run once beforehand, so no first-use compile delays the host past the spin.
SPIN_CYCLES = 200_000_000
N = 1 << 20


@pytest.fixture(scope="module")
def spin_then_fill():
    kernel = cupy.RawKernel(r"""
    extern "C" __global__ void spin_then_fill(float* out, long long n, long long cycles,
                                              float value) {
        long long start = clock64();
        while (clock64() - start < cycles) { }
        for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
             i += (long long)blockDim.x * gridDim.x) {
            out[i] = value;
        }
    }
    """, "spin_then_fill")

    def launch(out, value, cycles=SPIN_CYCLES):
        kernel((64,), (256,), (out, np.int64(out.size), np.int64(cycles), np.float32(value)))

    warm = cupy.zeros(N, cupy.float32)
    launch(warm, 1.0, cycles=1)
    with cupy.cuda.Stream(non_blocking=True):
        float(warm.copy().max())
    cupy.cuda.runtime.deviceSynchronize()
    return launch


@pytest.fixture
def torch_cuda():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA device")
    warm = torch.zeros(N, device="cuda")
    torch.cuda._sleep(1)
    warm.fill_(1.0).clone()
    torch.cuda.synchronize()
    return torch


def test_cupy_arrays_pass_through_on_the_current_stream():
    q = cupy.arange(6, dtype=cupy.float32)
    arrays, ctx = import_arrays({"q": q, "out": None})
    assert arrays["q"] is q and arrays["out"] is None
    assert (ctx.framework, ctx.device_id) == ("cupy", q.device.id)
    assert ctx.stream == cupy.cuda.get_current_stream()
    assert ctx.export(q) is q and ctx.export(None) is None
    assert is_cuda_array(q) and device_of(q) == q.device.id

    side = cupy.cuda.Stream(non_blocking=True)
    with side:
        _, ctx = import_arrays({"q": q})
    assert ctx.stream == side
    with ctx.activate() as stream:
        assert cupy.cuda.get_current_stream() == stream == side


def test_explicit_stream_forms():
    q = cupy.zeros(4, cupy.float32)
    side = cupy.cuda.Stream(non_blocking=True)

    class Protocol:
        def __cuda_stream__(self):
            return (0, side.ptr)

    for stream in (side, side.ptr, Protocol()):
        _, ctx = import_arrays({"q": q}, stream=stream)
        assert ctx.stream.ptr == side.ptr
        with ctx.activate():
            assert cupy.cuda.get_current_stream().ptr == side.ptr


def test_only_none_uses_the_current_device():
    arrays, ctx = import_arrays({"out": None, "lse": None})
    assert arrays == {"out": None, "lse": None}
    assert ctx.framework == "cupy" and ctx.device_id == cupy.cuda.runtime.getDevice()


def test_cupy_arrays_on_two_devices():
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA GPUs")
    with cupy.cuda.Device(0):
        a = cupy.zeros(4)
    with cupy.cuda.Device(1):
        b = cupy.zeros(4)
    with pytest.raises(ValueError, match=r"device 0 \(q\) and device 1 \(k_cache\)"):
        import_arrays({"q": a, "k_cache": b})


def test_torch_round_trip(torch_cuda):
    torch = torch_cuda
    x = torch.arange(12, device="cuda", dtype=torch.float32).reshape(3, 4)
    b = torch.ones(2, 8, device="cuda", dtype=torch.bfloat16)
    arrays, ctx = import_arrays({"x": x, "b": b, "none": None})
    assert ctx.framework == "torch" and ctx.device_id == x.device.index
    assert ctx.stream.ptr == torch.cuda.current_stream().cuda_stream
    assert arrays["x"].data.ptr == x.data_ptr() and arrays["x"].shape == (3, 4)
    assert arrays["b"].dtype.name == "bfloat16" and arrays["b"].data.ptr == b.data_ptr()
    assert len(ctx.keepalive) == 2 and ctx.keepalive[0] is x and ctx.keepalive[1] is b
    with ctx.activate():
        doubled = arrays["x"] * 2
    result = ctx.export(doubled)
    assert isinstance(result, torch.Tensor) and result.device == x.device
    assert result.data_ptr() == doubled.data.ptr
    assert torch.equal(result, x * 2)

    # Strided views and tensors that require grad come through as they are, zero-copy.
    w = torch.ones(4, 6, device="cuda", requires_grad=True)
    arrays, _ = import_arrays({"t": x.t(), "w": w})
    assert arrays["t"].strides == (4, 16) and arrays["t"].data.ptr == x.data_ptr()
    assert arrays["w"].data.ptr == w.data_ptr()


def test_torch_errors(torch_cuda):
    torch = torch_cuda
    with pytest.raises(TypeError, match="k_cache: .* in CPU memory"):
        import_arrays({"q": torch.zeros(2, device="cuda"), "k_cache": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"torch \(q\) and cupy \(k_cache\)"):
        import_arrays({"q": torch.zeros(2, device="cuda"), "k_cache": cupy.zeros(2)})


def test_torch_side_stream_is_picked_up(torch_cuda, spin_then_fill):
    torch = torch_cuda
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.zeros(N, device="cuda")
        torch.cuda._sleep(SPIN_CYCLES)
        x.fill_(3.0)
        arrays, ctx = import_arrays({"x": x})
        assert ctx.stream.ptr == side.cuda_stream
        with ctx.activate():
            copy = arrays["x"].copy()
    torch.cuda.synchronize()
    assert float(copy.min()) == float(copy.max()) == 3.0


def test_torch_work_is_ordered_before_an_explicit_stream(torch_cuda, spin_then_fill):
    torch = torch_cuda
    side = torch.cuda.Stream()
    ours = cupy.cuda.Stream(non_blocking=True)
    with torch.cuda.stream(side):
        x = torch.zeros(N, device="cuda")
        torch.cuda._sleep(SPIN_CYCLES)
        x.fill_(5.0)
        # torch's current stream is `side`; the DLPack handshake makes `ours` wait for it.
        arrays, ctx = import_arrays({"x": x}, stream=ours)
    assert ctx.stream.ptr == ours.ptr
    with ctx.activate():
        copy = arrays["x"].copy()
    ours.synchronize()
    assert float(copy.min()) == float(copy.max()) == 5.0
    torch.cuda.synchronize()


def test_export_to_torch_waits_for_our_stream(torch_cuda, spin_then_fill):
    torch = torch_cuda
    ours = cupy.cuda.Stream(non_blocking=True)
    _, ctx = import_arrays({"x": torch.zeros(4, device="cuda")}, stream=ours)
    with ctx.activate():
        out = cupy.zeros(N, cupy.float32)
        ours.synchronize()
        spin_then_fill(out, 7.0)
    seen = ctx.export(out).clone()  # on torch's current stream, which must wait for ours
    torch.cuda.synchronize()
    assert float(seen.min()) == float(seen.max()) == 7.0


def test_jax_round_trip(jax_gpu):
    jax, device = jax_gpu
    import jax.numpy as jnp

    x = jax.device_put(jnp.arange(12, dtype=jnp.float32).reshape(3, 4), device)
    b = jax.device_put(jnp.ones((2, 8), dtype=jnp.bfloat16), device)
    arrays, ctx = import_arrays({"x": x, "b": b})
    assert ctx.framework == "jax"
    assert ctx.stream == cupy.cuda.get_current_stream()
    assert arrays["b"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(arrays["x"].get(), np.arange(12).reshape(3, 4))
    with ctx.activate():
        doubled = arrays["x"] * 2
    result = ctx.export(doubled)
    assert isinstance(result, jax.Array)
    np.testing.assert_array_equal(np.asarray(result), 2 * np.arange(12).reshape(3, 4))


def test_jax_pending_work_is_ordered_before_ours(jax_gpu, spin_then_fill):
    jax, device = jax_gpu
    import jax.numpy as jnp

    @jax.jit
    def chain(a):  # ~0.2 s of matmuls, queued asynchronously
        return jax.lax.fori_loop(0, 400, lambda i, y: y @ a, a)

    a = jax.device_put(jnp.full((4096, 4096), 1.0 / 4096, jnp.float32), device)
    chain(a).block_until_ready()  # compile outside the timed part
    ours = cupy.cuda.Stream(non_blocking=True)
    y = chain(a)
    arrays, ctx = import_arrays({"y": y}, stream=ours)
    with ctx.activate():
        copy = arrays["y"].copy()
    ours.synchronize()
    np.testing.assert_allclose(copy.get(), np.asarray(y), rtol=1e-5)


def test_export_to_jax_waits_for_our_stream(jax_gpu, spin_then_fill):
    jax, device = jax_gpu
    import jax.numpy as jnp

    ours = cupy.cuda.Stream(non_blocking=True)
    total = jax.jit(jnp.sum)
    total(jax.device_put(jnp.zeros(N, jnp.float32), device)).block_until_ready()
    _, ctx = import_arrays({"x": jax.device_put(jnp.zeros(4, jnp.float32), device)},
                           stream=ours)
    with ctx.activate():
        out = cupy.zeros(N, cupy.float32)
        ours.synchronize()
        spin_then_fill(out, 9.0)
    assert float(total(ctx.export(out))) == 9.0 * N
