"""Exception types raised by mla_cupy (besides ValueError / TypeError for bad arguments), and the
wording of "no GPU" reasons (:func:`no_gpu_reason`)."""


class UnsupportedDeviceError(RuntimeError):
    """The current GPU (or the lack of one) cannot run mla_cupy's kernels."""


class CompileError(RuntimeError):
    """NVRTC rejected a kernel; ``log`` holds the compiler's program log."""

    def __init__(self, message, log=""):
        super().__init__(f"{message}\n{log}" if log else message)
        self.log = log


class CompileDisabledError(RuntimeError):
    """A kernel had to be compiled while MLA_CUPY_NO_COMPILE=1 forbids it (see warmup())."""


class WorkspaceOutOfMemoryError(MemoryError, RuntimeError):
    """The GPU has no memory left for the split-KV workspace a decode call needs.

    A ``MemoryError`` (as CuPy's own out-of-memory error is) and a ``RuntimeError`` (as every
    mla_cupy error is). ``nbytes``: the bytes the call needed; ``device``: the CUDA device id.
    Nothing was launched, and the library stays usable: a later call that needs less runs.
    """

    def __init__(self, message, nbytes=0, device=None):
        super().__init__(message)
        self.nbytes, self.device = nbytes, device


# How to get CuPy and NVRTC, for messages: the extras are declared in pyproject.toml, and the
# package is installed from a clone (it is not on a package index).
INSTALL_HINT = ('from the repository root, pip install ".[cuda12]" (".[cuda13]" with a CUDA 13 '
                'driver), or pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12')

# How to get NVRTC alone (CuPy there, its runtime compiler library not found).
NVRTC_INSTALL_HINT = ('from the repository root, pip install ".[cuda12]" (".[cuda13]" with a CUDA 13 '
                      'driver), or pip install nvidia-cuda-nvrtc-cu12 (nvidia-cuda-nvrtc for CUDA 13)')

_CUDA_ERROR_INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: also what CUDA says with no driver
_CUDA_ERROR_NO_DEVICE = 100  # cudaErrorNoDevice


def _driver_version():
    """The CUDA version the installed NVIDIA driver supports (e.g. 12080), or None when no
    driver library can be loaded."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    try:
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except AttributeError:
        return None
    return version.value


def no_gpu_reason(exc=None):
    """One line saying why mla_cupy cannot reach a GPU, from the exception raised looking for
    one: CuPy's import error, or a CUDA error from CuPy's runtime calls; ``None`` means the
    driver reported no devices. The underlying error is kept in parentheses.

    The single source of this wording: ``warmup()``, the decode calls, ``show_config()``, the
    benchmark, :func:`mla_cupy.testing.gpu_status` (the examples, the tests' skip reasons) use it.
    """
    if exc is None:
        return "no NVIDIA GPU found (the driver reports 0 devices)"
    cause = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ImportError):
        missing = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in (
            "cupy", "cupy_backends")
        what = "which is not installed" if missing else "which cannot be imported"
        return f"mla_cupy's GPU functions need CuPy, {what} ({cause}); to install it: {INSTALL_HINT}"
    status = getattr(exc, "status", None)
    if status == _CUDA_ERROR_INSUFFICIENT_DRIVER:
        version = _driver_version()
        if version is None:  # CUDA reports a missing driver as an insufficient one
            return f"no NVIDIA driver or GPU found ({cause})"
        return (f"the NVIDIA driver supports CUDA {version // 1000}.{version % 1000 // 10}, older than "
                f"the CUDA runtime of this CuPy needs: update the driver, or use the extra for that CUDA "
                f"version, cuda12 or cuda13 ({cause})")
    if status == _CUDA_ERROR_NO_DEVICE:
        return f"no NVIDIA GPU found ({cause})"
    return f"no usable NVIDIA GPU ({cause})"


def no_gpu_error(exc=None):
    """:class:`UnsupportedDeviceError` with :func:`no_gpu_reason`'s message (raise it ``from
    None``: the message already holds the underlying error)."""
    return UnsupportedDeviceError(no_gpu_reason(exc))


def one_line(exc):
    """``Type: message`` of an exception, its whitespace folded onto one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def nvrtc_missing_reason(exc):
    """One line saying that NVRTC, the CUDA runtime compiler CuPy loads on first use, cannot be
    loaded, what installs it, and the underlying error (in parentheses, on one line)."""
    cause = one_line(exc)
    return (f"mla_cupy compiles its kernels at run time with NVRTC, which cannot be loaded ({cause}); "
            f"to install it: {NVRTC_INSTALL_HINT}")


def nvrtc_missing_error(exc):
    """:class:`UnsupportedDeviceError` with :func:`nvrtc_missing_reason`'s message."""
    return UnsupportedDeviceError(nvrtc_missing_reason(exc))


def workspace_out_of_memory_error(device_id, rows, dv, exc):
    """WorkspaceOutOfMemoryError for a workspace of `rows` rows of `dv` + 1 fp32 values that could
    not be allocated (`exc`: the allocator's MemoryError)."""
    nbytes = rows * (dv + 1) * 4
    cause = one_line(exc)
    return WorkspaceOutOfMemoryError(
        f"out of GPU memory for mla_cupy's split-KV workspace: {nbytes:,} bytes on device {device_id} "
        f"({rows:,} rows of {dv + 1} fp32 partial results: (batch + schedule rows) x s_q x h_q, "
        f"{dv} values and a log-sum-exp each) ({cause}); free GPU memory held elsewhere (other "
        "arrays; memory cached by another framework's allocator, e.g. torch.cuda.empty_cache()) or "
        "decode the batch in smaller calls; nothing was launched and later calls that fit will run",
        nbytes=nbytes, device=device_id)
