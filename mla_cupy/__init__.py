"""mla_cupy: FlashMLA-compatible multi-head latent attention decode on CuPy + NVRTC."""

import logging

from ._env import CONFIG as _CONFIG
from ._errors import CompileDisabledError, CompileError, UnsupportedDeviceError, WorkspaceOutOfMemoryError
from ._version import __version__
from .interface import flash_mla_with_kvcache, get_mla_metadata, show_config, warmup

logging.getLogger("mla_cupy").addHandler(logging.NullHandler())
if _CONFIG.log_level != "WARNING":
    logging.getLogger("mla_cupy").setLevel(_CONFIG.log_level)

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache", "warmup", "show_config", "__version__",
           "UnsupportedDeviceError", "CompileError", "CompileDisabledError", "WorkspaceOutOfMemoryError"]
