"""Faults from outside the library, injected without a GPU: CuPy missing, no GPU, NVRTC missing,
no memory for the split-KV workspace, a schedule from other seqlens. docs/robustness.md lists
every fault, what mla_cupy does about it and the test that shows it."""

import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import mla_cupy
from mla_cupy import _compile, _errors, _metadata, interface
from mla_cupy._validate import check_metadata_data
from mla_cupy.scheduler import schedule
from mla_cupy.support import SCHED_METADATA_SIZE

pytestmark = pytest.mark.cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


# ---- CuPy missing ------------------------------------------------------------------------------

# An import hook that makes CuPy look uninstalled, the way Python reports a package that is not
# there (ModuleNotFoundError with its name), for cupy and cupy_backends alike.
BLOCK_CUPY = """
    import importlib.abc
    import sys

    class NoCupy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("cupy", "cupy_backends"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoCupy())
"""


def test_without_cupy_every_entry_point_gives_one_error_saying_what_installs_it():
    code = BLOCK_CUPY + """
    import io
    import numpy as np
    import mla_cupy
    from mla_cupy import _compile, _metadata

    calls = {
        "warmup": lambda: mla_cupy.warmup(),
        "warmup(dtypes)": lambda: mla_cupy.warmup(dtypes=["float16"], head_dims=[(576, 512)]),
        "get_mla_metadata": lambda: mla_cupy.get_mla_metadata(np.zeros(2, np.int32), 16, 1),
        "flash_mla_with_kvcache": lambda: mla_cupy.flash_mla_with_kvcache(
            None, None, None, None, 512, None, None),
        "compile_offline": lambda: _compile.compile_offline(_metadata.variant(), "sm_80"),
    }
    messages = set()
    for name, call in calls.items():
        try:
            call()
        except mla_cupy.UnsupportedDeviceError as exc:
            assert exc.__cause__ is None and exc.__suppress_context__, name
            messages.add(str(exc))
        else:
            raise AssertionError(name + " did not raise")
    assert len(messages) == 1, messages
    buf = io.StringIO()
    mla_cupy.show_config(file=buf)
    print(messages.pop())
    print(buf.getvalue())
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    message, config = proc.stdout.split("\n", 1)
    assert message == _errors.no_gpu_reason(ModuleNotFoundError("No module named 'cupy'",
                                                                name="cupy"))
    assert message.startswith("mla_cupy's GPU functions need CuPy, which is not installed (")
    assert 'from the repository root, pip install ".[cuda12]"' in message
    assert "pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12" in message
    assert "mla-cupy[" not in message  # no package index serves mla-cupy
    assert "which is not installed" in config and 'pip install ".[cuda12]"' in config


# ---- no GPU ------------------------------------------------------------------------------------

@pytest.mark.parametrize("status, start", [
    (35, "no NVIDIA driver or GPU found (CUDARuntimeError: cudaErrorInsufficientDriver"),
    (100, "no NVIDIA GPU found (CUDARuntimeError: cudaErrorNoDevice"),
])
def test_warmup_without_a_gpu_raises_the_no_gpu_error(monkeypatch, status, start):
    cupy = pytest.importorskip("cupy")
    from cupy_backends.cuda.api.runtime import CUDARuntimeError

    def no_device():
        raise CUDARuntimeError(status)

    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", no_device)
    monkeypatch.setattr(_errors, "_driver_version", lambda: None)  # no libcuda.so.1
    with pytest.raises(mla_cupy.UnsupportedDeviceError) as info:
        mla_cupy.warmup(head_dims=[(576, 512)], dtypes=["bfloat16"], num_q_tokens_per_head_k=16)
    assert str(info.value) == _errors.no_gpu_reason(CUDARuntimeError(status))
    assert str(info.value).startswith(start) and "\n" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    # Bad arguments are still named first, before the GPU is looked for.
    with pytest.raises(ValueError, match="dtypes"):
        mla_cupy.warmup(dtypes=["float32"])


# ---- NVRTC missing -----------------------------------------------------------------------------

def _assert_nvrtc_message(message):
    assert message.startswith("mla_cupy compiles its kernels at run time with NVRTC, which cannot "
                              "be loaded ("), message
    assert 'from the repository root, pip install ".[cuda12]"' in message, message
    assert "nvidia-cuda-nvrtc-cu12" in message and "\n" not in message, message


def test_nvrtc_missing_names_the_extra(monkeypatch, tmp_path):
    # CuPy is there but its NVRTC library is not: CuPy raises when a binding is first used.
    pytest.importorskip("cupy")
    import cupy_backends.cuda.libs as libs

    def not_found(*args):
        raise RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: cannot "
                           "open shared object file: No such file or directory")

    stub = types.SimpleNamespace(getVersion=not_found, createProgram=not_found,
                                 getSupportedArchs=not_found, NVRTCError=type("E", (Exception,), {}))
    monkeypatch.setattr(libs, "nvrtc", stub, raising=False)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", stub)
    _compile.nvrtc_version.cache_clear()
    _compile.device_arch.cache_clear()
    try:
        variant = _metadata.variant()
        for call in (_compile.nvrtc_version,
                     lambda: _compile.device_arch(90),
                     lambda: _compile.compile_offline(variant, "sm_80"),
                     lambda: _compile.build_cached(variant, "sm_80", str(tmp_path)),
                     _compile.probe_param_offsets):
            with pytest.raises(mla_cupy.UnsupportedDeviceError) as info:
                call()
            _assert_nvrtc_message(str(info.value))
            assert "RuntimeError: CuPy failed to load libnvrtc.so.12" in str(info.value)
        assert list(tmp_path.iterdir()) == []  # nothing half written to the cache
        import io

        buf = io.StringIO()
        mla_cupy.show_config(file=buf)
        line = [x for x in buf.getvalue().splitlines() if "NVRTC" in x]
        assert len(line) == 1
        _assert_nvrtc_message(line[0])
    finally:
        _compile.nvrtc_version.cache_clear()
        _compile.device_arch.cache_clear()


def test_nvrtc_library_not_found_by_cupy():
    # The same through CuPy's own loader: its library finder says libnvrtc is nowhere.
    pytest.importorskip("cuda.pathfinder", reason="this CuPy does not find NVRTC with "
                                                  "cuda.pathfinder")
    code = """
    import cuda.pathfinder as finder

    real = finder.load_nvidia_dynamic_lib

    def load(name, *args, **kwargs):
        if name == "nvrtc":
            raise finder.DynamicLibNotFoundError("Failure finding libnvrtc.so (simulated)")
        return real(name, *args, **kwargs)

    finder.load_nvidia_dynamic_lib = load
    from cupy_backends.cuda.libs import nvrtc
    try:
        nvrtc.getVersion()
    except Exception:
        pass
    else:
        print("SKIP: this CuPy loaded NVRTC without asking cuda.pathfinder")
        raise SystemExit(0)
    import mla_cupy
    from mla_cupy import _compile, _metadata
    try:
        _compile.compile_offline(_metadata.variant(), "sm_80")
    except mla_cupy.UnsupportedDeviceError as exc:
        print(exc)
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    _assert_nvrtc_message(proc.stdout.strip())
    assert "DynamicLibNotFoundError: Failure finding libnvrtc.so (simulated)" in proc.stdout


# ---- out of memory for the split-KV workspace --------------------------------------------------

class FakeBuffer:
    """Stands in for the fp32 CuPy array of one workspace."""

    next_ptr = 1 << 20

    def __init__(self, n):
        self.size, self.nbytes = n, 4 * n
        self.data = types.SimpleNamespace(ptr=FakeBuffer.next_ptr)
        FakeBuffer.next_ptr += 4 * n + 4096


def _cupy_oom(nbytes, total):
    """CuPy's out-of-memory error, made as CuPy's pool makes it."""
    memory = pytest.importorskip("cupy.cuda.memory")
    return memory.OutOfMemoryError(nbytes, total, 0)


@pytest.fixture
def small_gpu(monkeypatch):
    """Fresh workspace state on a fake device with `free` bytes; every allocation recorded."""
    state = types.SimpleNamespace(free=1 << 20, allocations=[], refused=[])
    monkeypatch.setattr(interface, "_workspaces", {})
    monkeypatch.setattr(interface, "_retired", [])
    monkeypatch.setattr(interface, "_capturing", lambda stream: False)

    def allocate(device_id, stream, n, graph=False):
        if 4 * n > state.free:
            state.refused.append(n)
            raise _cupy_oom(4 * n, 1 << 30)
        state.allocations.append(n)
        return FakeBuffer(n)

    monkeypatch.setattr(interface, "_allocate", allocate)
    return state


def test_workspace_out_of_memory_is_a_clear_error_and_the_library_stays_usable(small_gpu):
    rows, dv = 1000, 512  # 2,052,000 bytes: more than the 1 MiB there is
    with pytest.raises(mla_cupy.WorkspaceOutOfMemoryError) as info:
        interface._workspace(0, 7, rows, dv)
    exc = info.value
    assert isinstance(exc, MemoryError) and isinstance(exc, RuntimeError)
    assert exc.nbytes == rows * (dv + 1) * 4 == 2_052_000 and exc.device == 0
    message = str(exc)
    assert message.startswith("out of GPU memory for mla_cupy's split-KV workspace: 2,052,000 "
                              "bytes on device 0 (1,000 rows of 513 fp32 partial results")
    assert "OutOfMemoryError: Out of memory allocating" in message  # CuPy's own words
    assert "decode the batch in smaller calls" in message and "\n" not in message
    assert type(exc.__cause__).__name__ == "OutOfMemoryError"
    # Asked with headroom, then for exactly what the call needs; nothing kept.
    assert small_gpu.refused == [rows * 513 * 3 // 2, rows * 513]
    assert interface._workspaces == {} and interface._retired == []
    # A smaller call on the same stream works.
    o_accum, lse_accum, held = interface._workspace(0, 7, 100, dv)
    assert held.size >= 100 * 513 and lse_accum == o_accum + 100 * 512 * 4
    assert interface._workspaces[(0, 7)].buffer is held


def test_workspace_does_without_headroom_when_memory_is_short(small_gpu):
    small_gpu.free = 200 * 513 * 4  # room for exactly 200 rows, not for 300
    interface._workspace(0, 7, 200, 512)
    assert small_gpu.refused == [300 * 513] and small_gpu.allocations == [200 * 513]


def test_outgrowing_the_workspace_out_of_memory_keeps_the_library_usable(small_gpu):
    first = interface._workspace(0, 7, 100, 512)[2]
    with pytest.raises(mla_cupy.WorkspaceOutOfMemoryError):
        interface._workspace(0, 7, 10_000, 512)
    assert (0, 7) not in interface._workspaces  # the outgrown buffer went back to the pool
    again = interface._workspace(0, 7, 100, 512)[2]
    assert again is not first and small_gpu.allocations == [150 * 513, 150 * 513]


def test_decode_call_out_of_memory_launches_nothing(small_gpu):
    # A decode call on the host fast path: outputs allocated, then the workspace; on a failure
    # the kernels are not launched.
    launches = []
    plan = types.SimpleNamespace(ws_rows=10_000, ws_cols=512)
    call = interface._FastDecode.__new__(interface._FastDecode)
    call.framework, call.device_id, call.plan = "cupy", 0, plan
    call.launch = lambda *args: launches.append(args)
    call.new_out = lambda: ("out", 1 << 40)
    call.new_lse = lambda: ("lse", 2 << 40)
    call.new_results = lambda: ("out", 1 << 40, "lse", 2 << 40)
    call.stream = lambda framework, device_id: 7
    with pytest.raises(mla_cupy.WorkspaceOutOfMemoryError, match="20,520,000 bytes on device 0"):
        call.run([0] * 8, None, None)
    assert launches == []
    plan.ws_rows = 100
    assert call.run([0] * 8, None, None) == ("out", "lse") and len(launches) == 1


# ---- a schedule from another batch -------------------------------------------------------------

def test_schedule_of_other_seqlens_is_refused_with_validate():
    seqlens = np.array([100, 5000, 7, 3000], np.int32)
    sched, splits = schedule(seqlens, 4)
    check_metadata_data(sched, splits, seqlens)  # its own schedule passes
    other = seqlens[::-1].copy()  # the same batch size, other lengths
    with pytest.raises(ValueError, match="call get_mla_metadata again when cache_seqlens change"):
        check_metadata_data(sched, splits, other)


# ---- a cache of no blocks ----------------------------------------------------------------------

def _aligned_zeros(shape, dtype):
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(nbytes + 256, np.uint8)
    start = (-raw.ctypes.data) % 256
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def test_zero_block_cache_is_refused_even_when_every_length_is_0():
    # The lengths live on the GPU and are not read without validate=True, so the check cannot
    # know they are all 0: a cache of no blocks is refused whatever they are.
    import ml_dtypes

    from mla_cupy._validate import check_decode_args

    bf16 = ml_dtypes.bfloat16
    with pytest.raises(ValueError, match=r"k_cache: expected num_blocks \(first dimension\) >= 1"):
        check_decode_args(
            _aligned_zeros((2, 1, 16, 576), bf16), _aligned_zeros((0, 64, 1, 576), bf16),
            _aligned_zeros((2, 1), np.int32), _aligned_zeros((2,), np.int32), 512,
            _aligned_zeros((4, SCHED_METADATA_SIZE), np.int32), _aligned_zeros((3,), np.int32), None, True, False,
            None, None, None)
