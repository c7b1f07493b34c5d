"""Interop: framework dispatch, errors for host or foreign objects, streams, DLPack round trips.

The CPU tests use small stand-in classes whose ``__module__`` claims "torch" or "jax", so the
dispatch is exercised without importing either. Tests marked ``gpu`` use real CuPy, PyTorch and
JAX arrays and skip with a reason where a device or a framework is missing.
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX shares the GPU here

import cupy  # noqa: E402

from mla_cupy import _interop  # noqa: E402
from mla_cupy._interop import (  # noqa: E402
    Ctx,
    device_of,
    framework_of,
    import_arrays,
    is_cuda_array,
)

pytestmark = pytest.mark.cpu

ROOT = Path(__file__).resolve().parents[1]

DL_CPU, DL_CUDA, DL_CUDA_MANAGED = 1, 2, 13


def fake_array_class(module, device=(DL_CUDA, 0), name="Tensor"):
    """A DLPack producer stand-in whose type claims to come from ``module``."""

    def __dlpack__(self, **kwargs):
        raise AssertionError("a CPU test must not reach the conversion")

    def __dlpack_device__(self):
        if isinstance(self.device, Exception):
            raise self.device
        return self.device

    cls = type(name, (), {
        "__module__": module,
        "__dlpack__": __dlpack__,
        "__dlpack_device__": __dlpack_device__,
        "shape": (2, 3),
    })

    def make(device=device):
        obj = cls()
        obj.device = device
        return obj

    return make


FakeTorch = fake_array_class("torch")
FakeJax = fake_array_class("jaxlib._jax", name="ArrayImpl")
FakeOther = fake_array_class("someframework.arrays", name="DeviceArray")


# --------------------------------------------------------------------------------------------
# Dispatch without a GPU.


@pytest.mark.parametrize("module, expected", [
    ("cupy", "cupy"), ("cupy._core.core", "cupy"), ("torch", "torch"),
    ("torch.nn.parameter", "torch"), ("jax", "jax"), ("jax._src.array", "jax"),
    ("jaxlib.xla_extension", "jax"), ("jaxlib._jax", "jax"), ("numpy", None),
    ("torchvision", None), ("jaxtyping", None), ("builtins", None),
])
def test_framework_of_reads_the_type_module(module, expected):
    cls = type("T", (), {"__module__": module})
    assert framework_of(cls()) == expected


def test_is_cuda_array_and_device_of():
    assert is_cuda_array(FakeTorch())
    assert is_cuda_array(FakeJax((DL_CUDA_MANAGED, 1)))
    assert device_of(FakeJax((DL_CUDA, 3))) == 3
    assert not is_cuda_array(FakeTorch((DL_CPU, 0)))
    assert not is_cuda_array(FakeTorch(RuntimeError("sharded")))
    assert not is_cuda_array(np.zeros(3))
    assert not is_cuda_array([1, 2, 3])
    assert not is_cuda_array(None)
    with pytest.raises(TypeError, match="expected a CUDA array"):
        device_of(np.zeros(3))


@pytest.mark.parametrize("value, got", [
    (np.zeros((2, 3), np.float32), "numpy.ndarray of shape (2, 3) in CPU memory"),
    ([1.0, 2.0], "got list"),
    (3.5, "got float"),
    (7, "got int"),
    (object(), "got object"),
    (FakeTorch((DL_CPU, 0)), "torch.Tensor of shape (2, 3) in CPU memory"),
    (FakeJax((3, 0)), "in CUDA host (pinned) memory"),
    (FakeTorch(RuntimeError("no device")), "does not report a device"),
], ids=["numpy", "list", "float", "int", "object", "cpu-torch", "pinned-jax", "no-device"])
def test_host_and_foreign_objects_raise_type_error(value, got):
    with pytest.raises(TypeError) as info:
        import_arrays({"q": FakeTorch(), "k_cache": value, "out": None})
    message = str(info.value)
    assert message.startswith("k_cache: expected a CUDA array: cupy.ndarray or a CUDA DLPack "
                              "producer such as a torch.Tensor or jax.Array on a GPU")
    assert got in message


def test_jax_tracer_gets_a_hint():
    Tracer = fake_array_class("jax._src.interpreters.partial_eval", name="DynamicJaxprTracer")
    with pytest.raises(TypeError, match="outside jax.jit"):
        import_arrays({"q": Tracer(RuntimeError("traced"))})


def test_two_frameworks_raise_value_error():
    with pytest.raises(ValueError) as info:
        import_arrays({"q": FakeTorch(), "out": None, "k_cache": FakeJax()})
    message = str(info.value)
    assert "q and k_cache" in message
    assert "torch (q)" in message and "jax (k_cache)" in message


def test_unknown_dlpack_producer_mixes_with_any_framework():
    # Its results come back as the known framework's; here the check stops at the device step.
    with pytest.raises(ValueError, match=r"device 0 \(q\) and device 1 \(block_table\)"):
        import_arrays({"q": FakeTorch(), "k_cache": FakeOther(), "block_table": FakeOther(
            (DL_CUDA, 1))})


def test_two_devices_raise_value_error():
    with pytest.raises(ValueError) as info:
        import_arrays({"q": FakeTorch((DL_CUDA, 0)), "lse": FakeTorch((DL_CUDA, 1))})
    message = str(info.value)
    assert "q and lse" in message and "device 0 (q)" in message and "device 1 (lse)" in message


@pytest.mark.parametrize("stream, exc, fragment", [
    ("default", TypeError, "got str"),
    (1.5, TypeError, "got float"),
    (True, TypeError, "got bool"),
    (object(), TypeError, "got object"),
    (np.zeros(2), TypeError, "numpy.ndarray"),
    (-5, ValueError, "got -5"),
    (types.SimpleNamespace(__cuda_stream__=lambda: 5), TypeError, "__cuda_stream__()"),
    (types.SimpleNamespace(__cuda_stream__=lambda: (1, 5)), ValueError, "version 1"),
    (types.SimpleNamespace(cuda_stream="0x10"), TypeError, "types.SimpleNamespace"),
], ids=["str", "float", "bool", "object", "ndarray", "negative", "protocol-not-tuple",
        "protocol-version", "cuda-stream-str"])
def test_bad_stream(stream, exc, fragment):
    with pytest.raises(exc) as info:
        import_arrays({"q": FakeTorch()}, stream=stream)
    message = str(info.value)
    assert message.startswith("stream:") and fragment in message
    if exc is TypeError and "__cuda_stream__()" not in fragment:
        assert "torch.cuda.Stream" in message


def test_stream_of_another_device_raises_value_error():
    torch_like_stream = types.SimpleNamespace(cuda_stream=1234,
                                              device=types.SimpleNamespace(index=1))
    with pytest.raises(ValueError, match="stream: expected a stream of device 0 .* device 1"):
        import_arrays({"q": FakeTorch((DL_CUDA, 0))}, stream=torch_like_stream)


def test_accepted_stream_forms_resolve_to_a_pointer():
    class Protocol:
        def __cuda_stream__(self):
            return (0, 0xBEEF)

    assert _interop._stream_pointer(0xABC) == (0xABC, None)
    assert _interop._stream_pointer(Protocol()) == (0xBEEF, None)
    torch_like = types.SimpleNamespace(cuda_stream=0x123, device=types.SimpleNamespace(index=0))
    assert _interop._stream_pointer(torch_like) == (0x123, None)
    assert _interop._stream_device(torch_like) == 0


def test_ctx_is_frozen():
    ctx = Ctx("cupy", 0, None)
    with pytest.raises(AttributeError):
        ctx.framework = "torch"


def _run_python(code):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


_NO_FRAMEWORKS = ("bad = sorted(m for m in ('torch', 'jax', 'jaxlib') if m in sys.modules); "
                  "print(bad); sys.exit(1 if bad else 0)")


def test_interop_and_validate_import_neither_torch_nor_jax():
    result = _run_python("import sys, mla_cupy._interop, mla_cupy._validate; " + _NO_FRAMEWORKS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not (ROOT / "mla_cupy" / "__init__.py").exists(),
                    reason="mla_cupy/__init__.py does not exist yet")
def test_package_import_pulls_neither_torch_nor_jax():
    result = _run_python("import sys, mla_cupy; " + _NO_FRAMEWORKS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_library_code_has_no_assert():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(_interop))
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Assert)]


# --------------------------------------------------------------------------------------------
# With a GPU: real CuPy, PyTorch and JAX arrays.


gpu = pytest.mark.gpu  # conftest.py skips these, with the reason, where no usable GPU exists

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


@pytest.fixture
def jax_gpu():
    jax = pytest.importorskip("jax", reason="JAX is not installed")
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        devices = []
    if not devices:
        pytest.skip("JAX has no GPU backend")
    return jax, devices[0]


@gpu
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


@gpu
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


@gpu
def test_only_none_uses_the_current_device():
    arrays, ctx = import_arrays({"out": None, "lse": None})
    assert arrays == {"out": None, "lse": None}
    assert ctx.framework == "cupy" and ctx.device_id == cupy.cuda.runtime.getDevice()


@gpu
def test_cupy_arrays_on_two_devices():
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA GPUs")
    with cupy.cuda.Device(0):
        a = cupy.zeros(4)
    with cupy.cuda.Device(1):
        b = cupy.zeros(4)
    with pytest.raises(ValueError, match=r"device 0 \(q\) and device 1 \(k_cache\)"):
        import_arrays({"q": a, "k_cache": b})


@gpu
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


@gpu
def test_torch_errors(torch_cuda):
    torch = torch_cuda
    with pytest.raises(TypeError, match="k_cache: .* in CPU memory"):
        import_arrays({"q": torch.zeros(2, device="cuda"), "k_cache": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"torch \(q\) and cupy \(k_cache\)"):
        import_arrays({"q": torch.zeros(2, device="cuda"), "k_cache": cupy.zeros(2)})


@gpu
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


@gpu
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


@gpu
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


@gpu
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


@gpu
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


@gpu
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
