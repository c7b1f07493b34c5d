"""Interop: framework dispatch, errors for host or foreign objects, streams, DLPack round trips.

The CPU tests use small stand-in classes whose ``__module__`` claims "torch" or "jax", so the
dispatch is exercised without importing either. tests/test_interop_gpu.py has the GPU side.
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from mla_cupy import _interop
from mla_cupy._interop import (
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


def test_package_import_pulls_neither_torch_nor_jax():
    result = _run_python("import sys, mla_cupy; " + _NO_FRAMEWORKS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_library_code_has_no_assert():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(_interop))
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Assert)]
