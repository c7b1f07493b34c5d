"""Environment switches, all prefixed MLA_CUPY_, read once at import into a frozen config.

| variable | default | effect |
|---|---|---|
| MLA_CUPY_CACHE_DIR | $XDG_CACHE_HOME/mla_cupy, else ~/.cache/mla_cupy | where compiled kernels are cached on disk |
| MLA_CUPY_LOG_LEVEL | WARNING | level of the "mla_cupy" logger (compile and cache events at INFO) |
| MLA_CUPY_DUMP_SOURCE | unset | directory: write each assembled translation unit there before compiling |
| MLA_CUPY_NO_COMPILE | 0 | 1: any compile after import raises CompileDisabledError (use after warmup()) |
| MLA_CUPY_VALIDATE | 0 | 1: check device data (seqlens, block ids) on every call; costs a host sync |
| MLA_CUPY_PDL | 1 | 0: launch the combine after the sm90 decode as an ordinary launch instead of a programmatic dependent launch (which overlaps its start with the decode's end; needs a CUDA 12.3 driver) |
| MLA_CUPY_KERNEL | auto | decode kernel family: auto (the fastest that runs the problem), portable or sm90; a family that cannot run a problem raises UnsupportedDeviceError |
"""

import dataclasses
import os
import warnings


def _flag(name):
    value = os.environ.get(name, "0").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _flag_default_on(name):
    return _flag(name) if os.environ.get(name, "").strip() else True


@dataclasses.dataclass(frozen=True)
class Config:
    cache_dir: str
    log_level: str
    dump_source: str | None
    no_compile: bool
    validate: bool
    kernel: str
    pdl: bool


KERNEL_KINDS = ("auto", "portable", "sm90")  # mla_cupy._select.KERNELS


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level():
    level = os.environ.get("MLA_CUPY_LOG_LEVEL", "WARNING").strip().upper() or "WARNING"
    if level not in _LOG_LEVELS:
        warnings.warn(f"MLA_CUPY_LOG_LEVEL: expected one of {', '.join(_LOG_LEVELS)}, got {level!r}; "
                      "using WARNING", stacklevel=3)
        return "WARNING"
    return level


def _kernel():
    kind = os.environ.get("MLA_CUPY_KERNEL", "auto").strip().lower() or "auto"
    if kind not in KERNEL_KINDS:
        warnings.warn(f"MLA_CUPY_KERNEL: expected one of {', '.join(KERNEL_KINDS)}, got {kind!r}; using auto",
                      stacklevel=3)
        return "auto"
    return kind


def _default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mla_cupy")


def read_config():
    return Config(
        cache_dir=os.environ.get("MLA_CUPY_CACHE_DIR") or _default_cache_dir(),
        log_level=_log_level(),
        dump_source=os.environ.get("MLA_CUPY_DUMP_SOURCE") or None,
        no_compile=_flag("MLA_CUPY_NO_COMPILE"),
        validate=_flag("MLA_CUPY_VALIDATE"),
        kernel=_kernel(),
        pdl=_flag_default_on("MLA_CUPY_PDL"),
    )


CONFIG = read_config()
