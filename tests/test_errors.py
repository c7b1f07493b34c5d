"""What a user sees without CuPy, without a driver or without a GPU: one clear line, worded by
mla_cupy._errors.no_gpu_reason, the same from every entry point."""

import os
import subprocess
import sys
import textwrap

import pytest

import mla_cupy
from mla_cupy import _errors

pytestmark = pytest.mark.cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeCudaError(Exception):
    """Stands in for CuPy's CUDARuntimeError: a status code and CUDA's message."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def run_python(code, **env):
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cupy_missing_says_what_installs_it():
    reason = _errors.no_gpu_reason(ModuleNotFoundError("No module named 'cupy'", name="cupy"))
    assert "need CuPy, which is not installed (ModuleNotFoundError: No module named 'cupy')" in reason
    assert 'pip install ".[cuda12]"' in reason and "from the repository root" in reason
    assert "pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12" in reason
    assert "mla-cupy[" not in reason  # no package index serves mla-cupy


def test_cupy_that_cannot_be_imported_is_not_called_missing():
    reason = _errors.no_gpu_reason(ImportError("libcudart.so.12: cannot open shared object file"))
    assert "CuPy, which cannot be imported (ImportError: libcudart.so.12" in reason


def test_missing_driver_is_named_as_such(monkeypatch):
    monkeypatch.setattr(_errors, "_driver_version", lambda: None)
    exc = FakeCudaError(35, "cudaErrorInsufficientDriver: CUDA driver version is insufficient for "
                            "CUDA runtime version")
    reason = _errors.no_gpu_reason(exc)
    assert reason.startswith("no NVIDIA driver or GPU found (FakeCudaError: cudaErrorInsufficientDriver")
    assert "\n" not in reason


def test_old_driver_is_named_as_such(monkeypatch):
    monkeypatch.setattr(_errors, "_driver_version", lambda: 11080)
    reason = _errors.no_gpu_reason(FakeCudaError(35, "cudaErrorInsufficientDriver: ..."))
    assert reason.startswith("the NVIDIA driver supports CUDA 11.8, older than")
    assert "no NVIDIA driver" not in reason


def test_no_device_and_zero_devices():
    reason = _errors.no_gpu_reason(FakeCudaError(100, "cudaErrorNoDevice: no CUDA-capable device is detected"))
    assert reason == "no NVIDIA GPU found (FakeCudaError: cudaErrorNoDevice: no CUDA-capable device is detected)"
    assert _errors.no_gpu_reason(None) == "no NVIDIA GPU found (the driver reports 0 devices)"
    assert _errors.no_gpu_reason(FakeCudaError(999, "odd")) == "no usable NVIDIA GPU (FakeCudaError: odd)"


def test_no_gpu_error_is_the_public_class():
    exc = _errors.no_gpu_error(None)
    assert isinstance(exc, mla_cupy.UnsupportedDeviceError)
    assert str(exc) == _errors.no_gpu_reason(None)


def test_without_cupy_warmup_and_the_decode_calls_raise_the_same_error():
    code = """
        import sys
        sys.modules["cupy"] = None  # as if CuPy were not installed
        import numpy as np
        import mla_cupy
        from mla_cupy import _errors

        calls = {
            "warmup": lambda: mla_cupy.warmup(),
            "get_mla_metadata": lambda: mla_cupy.get_mla_metadata(np.zeros(2, np.int32), 16, 1),
            "flash_mla_with_kvcache": lambda: mla_cupy.flash_mla_with_kvcache(
                None, None, None, None, 512, None, None),
        }
        seen = set()
        for name, call in calls.items():
            try:
                call()
            except Exception as exc:
                assert exc.__cause__ is None and exc.__suppress_context__, name
                seen.add((type(exc).__name__, str(exc)))
            else:
                raise AssertionError(name + " did not raise")
        assert len(seen) == 1, seen
        kind, message = seen.pop()
        assert kind == "UnsupportedDeviceError", kind
        assert message == _errors.no_gpu_reason(ModuleNotFoundError(
            "import of cupy halted; None in sys.modules", name="cupy")), message
        print("OK", message)
    """
    proc = run_python(code)
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stdout + proc.stderr


def test_show_config_without_cupy_says_what_installs_it():
    code = """
        import sys
        sys.modules["cupy"] = None
        import mla_cupy
        mla_cupy.show_config()
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert 'pip install ".[cuda12]"' in proc.stdout and "mla_cupy.reference" in proc.stdout, proc.stdout


def test_warmup_without_a_gpu_raises_unsupported_device_error(gpu_available):
    if gpu_available:
        pytest.skip("a CUDA GPU is visible")
    with pytest.raises(mla_cupy.UnsupportedDeviceError) as info:
        mla_cupy.warmup(head_dims=[(576, 512)], dtypes=["bfloat16"], num_q_tokens_per_head_k=16)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(("no NVIDIA", "the NVIDIA driver", "no usable NVIDIA",
                                       "mla_cupy's GPU functions need CuPy")), str(info.value)


def test_show_config_without_a_driver_does_not_blame_the_driver_version(gpu_available, monkeypatch):
    if gpu_available:
        pytest.skip("a CUDA GPU is visible")
    if _errors._driver_version() is not None:
        pytest.skip("an NVIDIA driver library is installed here")
    pytest.importorskip("cupy")
    import io

    buf = io.StringIO()
    mla_cupy.show_config(file=buf)
    lines = buf.getvalue().splitlines()
    reason = [line for line in lines if "no NVIDIA driver or GPU found (" in line]
    assert len(reason) == 1, lines
    assert any(line.startswith("CUDA driver not found") for line in lines), lines


def test_gpu_status_without_cupy_gives_the_install_hint(monkeypatch):
    from mla_cupy.testing import gpu_status

    monkeypatch.setitem(sys.modules, "cupy", None)
    ok, reason = gpu_status()
    assert not ok
    assert reason == _errors.no_gpu_reason(ModuleNotFoundError(
        "import of cupy halted; None in sys.modules", name="cupy"))


def test_gpu_status_agrees_with_the_test_lanes(gpu_available):
    from mla_cupy.testing import gpu_status

    ok, reason = gpu_status()
    assert ok == gpu_available
    assert "\n" not in reason


def test_bench_without_a_gpu_ends_in_one_line(gpu_available):
    if gpu_available:
        pytest.skip("a CUDA GPU is visible")
    from mla_cupy.testing import gpu_status

    proc = subprocess.run([sys.executable, "-m", "mla_cupy.bench", "--quick"], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
                          capture_output=True, text=True, timeout=300)
    both = proc.stdout + proc.stderr
    assert proc.returncode == 2, both
    assert proc.stdout == "", both
    assert proc.stderr == f"python -m mla_cupy.bench: cannot run: {gpu_status()[1]}\n", both
    assert "Traceback" not in both and "Exception ignored" not in both


def test_quickstart_without_a_gpu_gives_the_reason(gpu_available):
    if gpu_available:
        pytest.skip("a CUDA GPU is visible")
    from mla_cupy.testing import gpu_status

    proc = run_python("import runpy; runpy.run_path('examples/quickstart.py', run_name='__main__')")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f"No CUDA GPU available: {gpu_status()[1]}. "), first
    if _errors._driver_version() is None and "CuPy" not in first:
        assert "no NVIDIA driver or GPU found (" in first, first
