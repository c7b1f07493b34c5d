"""Exception types raised by mla_cupy (besides ValueError / TypeError for bad arguments)."""


class UnsupportedDeviceError(RuntimeError):
    """The current GPU (or the lack of one) cannot run mla_cupy's kernels."""


class CompileError(RuntimeError):
    """NVRTC rejected a kernel; ``log`` holds the compiler's program log."""

    def __init__(self, message, log=""):
        super().__init__(f"{message}\n{log}" if log else message)
        self.log = log


class CompileDisabledError(RuntimeError):
    """A kernel had to be compiled while MLA_CUPY_NO_COMPILE=1 forbids it (see warmup())."""
