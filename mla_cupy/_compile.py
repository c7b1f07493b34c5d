"""Compile entry: assembles kernels/*.cuh into translation units and builds modules.

* A module is a ``Variant``: a name, the template instantiations it holds
  (``name_expressions``), the kernel files making its translation unit, its target arch (None:
  the device's own) and extra NVRTC options. Scheduler, combine and each decode configuration
  are variants of their own.
* ``translation_unit(files)``: the files in order, preceded by a first line naming the package
  version and a SHA-256 of those sources, with the params static_asserts after params.cuh.
* ``build_cached(variant, arch)`` runs NVRTC (no GPU needed) and keeps the binary in the
  library's own cache directory (``cache_dir()``: MLA_CUPY_CACHE_DIR, else the user cache
  directory), keyed by a SHA-256 of the source, options, arch, NVRTC version and kernel names;
  ``get_module(device, variant)`` builds or reads it once per process and device and loads it.
  ``compile_offline(variant, arch)`` builds with the same options, uncached (the compile test
  lane and resource reports).
* What a module holds and how it is launched is its family's business (``_portable``,
  ``_combine``, ``_metadata``; ``_select`` picks one).
"""

import collections
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.resources
import json
import logging
import os
import pathlib
import tempfile
import threading
import time
import warnings

from . import _params
from ._env import CONFIG
from ._errors import CompileDisabledError, CompileError, no_gpu_error, nvrtc_missing_error
from ._version import __version__

logger = logging.getLogger("mla_cupy")

COMMON_FILES = ("prelude.cuh", "params.cuh")  # every translation unit starts with these
NVRTC_OPTIONS = ("-std=c++17",)

def _kernels_dir():
    try:
        root = importlib.resources.files("mla_cupy.kernels")
        if root.joinpath(COMMON_FILES[0]).is_file():
            return root
    except ModuleNotFoundError:
        pass
    root = pathlib.Path(__file__).resolve().parent.parent / "kernels"
    if not (root / COMMON_FILES[0]).is_file():
        raise CompileError(f"kernel sources not found (looked in mla_cupy.kernels and {root})")
    return root


@functools.cache
def kernel_files():
    """Names of every kernel source file shipped with the package, sorted."""
    return tuple(sorted(p.name for p in _kernels_dir().iterdir() if p.name.endswith(".cuh")))


@functools.cache
def _source_text(name):
    return _kernels_dir().joinpath(name).read_text(encoding="utf-8")


def _sources(files):
    return tuple((name, _source_text(name)) for name in files)


@functools.cache
def source_digest(files=None):
    """SHA-256 (hex) over the named kernel source files (name and text); default: all of them."""
    h = hashlib.sha256()
    for name, text in _sources(kernel_files() if files is None else files):
        h.update(name.encode())
        h.update(b"\0")
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()


@functools.cache
def translation_unit(files):
    """The CUDA source made of `files` (kernels/*.cuh names, in order): a first line with the
    package version and the SHA-256 of those sources, then each file; the parameter layout
    checks follow params.cuh."""
    files = tuple(files)
    parts = [f"// mla_cupy {__version__} kernels sha256:{source_digest(files)}\n"]
    for name, text in _sources(files):
        parts.append(f"// ---- {name} ----\n{text}\n")
        if name == "params.cuh":
            parts.append("// ---- generated: parameter layout checks ----\n" + _params.static_asserts())
    return "".join(parts)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled module.

    name: unique module name (also names cache entries and dumped sources).
    name_expressions: the kernel instantiations it holds; launchers find a kernel by its
        expression, never by position.
    files: kernels/*.cuh making its translation unit, in order.
    arch: None for portable code (built for the device's own ``sm_XY``), or the one target it
        is written for, e.g. "sm_90a".
    options: NVRTC options beyond ``NVRTC_OPTIONS``.
    checks: (C++ constant expression, value) pairs: constants the Python side relies on (shared
        memory bytes, threads, tile sizes), asserted equal by generated ``static_assert``s, so a
        drift fails the compile instead of a launch.
    """

    name: str
    name_expressions: tuple
    files: tuple
    arch: str | None = None
    options: tuple = ()
    checks: tuple = ()

    def source(self):
        """The full CUDA source this module is compiled from."""
        return translation_unit(self.files) + render_checks(self.checks)


def render_checks(checks):
    """The generated static_asserts of a variant's `checks` (empty text when there are none)."""
    if not checks:
        return ""
    lines = ["// ---- generated: constants mirrored in Python ----"]
    for expr, value in checks:
        lines.append(f'static_assert({expr} == {int(value)}, "{expr} differs from the Python side ({int(value)})");')
    return "\n".join(lines) + "\n"


def dtype_tag(dtype):
    """Short dtype name used in module names."""
    return {"bfloat16": "bf16", "float16": "fp16"}[dtype]


def cpp_elem(dtype):
    """The element-type traits of a dtype (kernels/prelude.cuh), as a template argument."""
    return "mla::Bf16" if dtype == "bfloat16" else "mla::Fp16"




# ---- building -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OfflineBuild:
    cubin: bytes
    log: str
    lowered_names: dict


def build_options(variant, arch):
    """The NVRTC options of `variant` for `arch`: the same at run time and in the compile lane
    (ptxas' verbose report only adds to the program log)."""
    return (f"--gpu-architecture={arch}", *NVRTC_OPTIONS, *variant.options, "--ptxas-options=--verbose")


def _nvrtc():
    """CuPy's NVRTC bindings, with the NVRTC library loaded. CuPy loads the library on first
    use, so a missing one shows here, as UnsupportedDeviceError saying what installs it, not as
    a loader error from deep inside the first compile; a missing CuPy gives the library's no-CuPy
    error."""
    try:
        importlib.import_module("cupy")  # first, so that a missing CuPy reads as it does elsewhere
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        raise no_gpu_error(exc) from None
    try:
        nvrtc.getVersion()
    except Exception as exc:  # noqa: BLE001 - whatever CuPy raises when the library is not found
        raise nvrtc_missing_error(exc) from None
    return nvrtc


def _nvrtc_build(variant, arch, extra_options=()):
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(variant.source(), f"{variant.name}.cu", [], [])
    try:
        for expr in variant.name_expressions:
            nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, [*build_options(variant, arch), *extra_options])
        except nvrtc.NVRTCError as exc:
            raise CompileError(f"NVRTC failed to compile {variant.name} for {arch}", nvrtc.getProgramLog(prog)) from exc
        lowered = {expr: nvrtc.getLoweredName(prog, expr) for expr in variant.name_expressions}
        image = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog)
        return OfflineBuild(bytes(image), nvrtc.getProgramLog(prog), lowered)
    finally:
        nvrtc.destroyProgram(prog)


def compile_offline(variant, arch=None, extra_options=()):
    """Builds `variant` with NVRTC alone, no GPU needed: for the variant's own arch when it
    declares one, else for `arch` (e.g. "sm_80", "sm_90a").

    The log carries ptxas' resource report (registers, shared memory, spills) per kernel.
    """
    arch = variant.arch or arch
    if arch is None:
        raise ValueError(f"compile_offline({variant.name!r}): the variant is portable; name an arch")
    return _nvrtc_build(variant, arch, extra_options)


@functools.cache
def nvrtc_version():
    return tuple(_nvrtc().getVersion())


@functools.cache
def device_arch(compute_capability):
    """NVRTC target for portable code on a device of this compute capability (e.g. 90): its own
    ``sm_XY``, or PTX for the newest arch NVRTC knows when the device is newer than NVRTC."""
    nvrtc = _nvrtc()
    try:
        known = tuple(nvrtc.getSupportedArchs())
    except Exception:  # noqa: BLE001 - an NVRTC without the query: assume it knows the device
        known = (compute_capability,)
    if compute_capability in known or not known:
        return f"sm_{compute_capability}"
    return f"compute_{max(a for a in known if a <= compute_capability)}"


# ---- the on-disk cache ---------------------------------------------------------------------------
# One file per (variant, arch, key): a magic line, one line of JSON (key, lowered kernel names,
# size and SHA-256 of the image) and the image itself. Written to a temporary file in the same
# directory and renamed into place, so a reader sees a whole entry or none.

_CACHE_MAGIC = b"mla_cupy kernel cache 1\n"
_unwritable = {}  # cache directories found unwritable -> the error (warned about once)
_compiles = collections.Counter()  # module name -> NVRTC builds by build_cached in this process


def cache_dir():
    """The directory compiled kernels are cached in (MLA_CUPY_CACHE_DIR, else the user cache)."""
    return CONFIG.cache_dir


def cache_location():
    """What show_config reports: the cache directory, or why kernels compile in memory."""
    directory = cache_dir()
    if directory in _unwritable:
        return f"{directory} (not writable: {_unwritable[directory]}; kernels compile in memory)"
    return directory


def cache_key(variant, arch):
    """SHA-256 over everything the binary depends on: source, options, arch, NVRTC, kernels."""
    h = hashlib.sha256()
    for part in (variant.source(), "\0".join(build_options(variant, arch)), arch,
                 "%d.%d" % nvrtc_version(), "\0".join(variant.name_expressions)):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class CachedBuild:
    image: bytes  # cubin (or PTX for a device newer than NVRTC)
    lowered_names: dict  # name expression -> lowered (mangled) kernel name
    path: str | None  # the cache entry, None when the cache directory is not writable
    hit: bool  # loaded from the cache, no NVRTC run


def _read_entry(path, key, variant):
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(_CACHE_MAGIC):
        raise ValueError("no cache header")
    end = data.index(b"\n", len(_CACHE_MAGIC))
    meta = json.loads(data[len(_CACHE_MAGIC):end])
    image = data[end + 1:]
    if meta.get("key") != key:
        raise ValueError("key differs")
    if len(image) != meta.get("size") or hashlib.sha256(image).hexdigest() != meta.get("sha256"):
        raise ValueError("image truncated or altered")
    if not (image.startswith(b"\x7fELF") or meta.get("ptx")):
        raise ValueError("image is not an ELF cubin")
    lowered = meta.get("lowered")
    if not isinstance(lowered, dict) or set(lowered) != set(variant.name_expressions):
        raise ValueError("kernel names differ")
    return image, lowered


def _write_entry(directory, path, key, arch, build):
    meta = dict(key=key, arch=arch, lowered=build.lowered_names,
                size=len(build.cubin), sha256=hashlib.sha256(build.cubin).hexdigest(),
                ptx=not arch.startswith("sm_"))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_CACHE_MAGIC + json.dumps(meta, sort_keys=True).encode() + b"\n" + build.cubin)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def build_cached(variant, arch, directory=None):
    """The binary of `variant` for `arch` from the cache directory, built with NVRTC (and
    stored) when missing or damaged; no GPU needed. `directory` defaults to ``cache_dir()``.

    A damaged entry is rebuilt with a warning; an unwritable directory gives one warning, and
    the binary is then kept in memory only.
    """
    directory = directory or cache_dir()
    key = cache_key(variant, arch)
    path = os.path.join(directory, f"{variant.name}.{arch}.{key[:32]}.bin")
    t0 = time.perf_counter()
    if os.path.exists(path):
        try:
            image, lowered = _read_entry(path, key, variant)
        except (OSError, ValueError) as exc:
            warnings.warn(f"mla_cupy: kernel cache entry {path} is damaged ({exc}); rebuilding it",
                          RuntimeWarning, stacklevel=2)
        else:
            logger.info("module %s (%s) loaded from the cache in %.3f s", variant.name, arch, time.perf_counter() - t0)
            return CachedBuild(image, lowered, path, True)
    build = _nvrtc_build(variant, arch)
    _compiles[variant.name] += 1
    logger.info("module %s compiled for %s in %.2f s", variant.name, arch, time.perf_counter() - t0)
    try:
        _write_entry(directory, path, key, arch, build)
    except OSError as exc:
        if directory not in _unwritable:
            _unwritable[directory] = str(exc)
            warnings.warn(f"mla_cupy: kernel cache directory {directory} is not writable ({exc}); "
                          "kernels are compiled in memory and not kept", RuntimeWarning, stacklevel=2)
        path = None
    return CachedBuild(build.cubin, build.lowered_names, path, False)


# ---- loading -------------------------------------------------------------------------------------

_lock = threading.Lock()
_modules = {}  # (device id, variant) -> LoadedModule
_compile_allowed = threading.local()


class LoadedModule:
    """A variant's binary loaded on one device; kernels are looked up by name expression."""

    def __init__(self, module, lowered_names):
        self._module, self._lowered = module, lowered_names

    def get_function(self, expr):
        """The cupy.cuda.function.Function of one kernel instantiation of the variant."""
        return self._module.get_function(self._lowered[expr])


def _dump(variant):
    if CONFIG.dump_source:
        path = pathlib.Path(CONFIG.dump_source)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{variant.name}.cu").write_text(variant.source())


class allow_compile:
    """Context in which get_module may compile even under MLA_CUPY_NO_COMPILE=1 (warmup)."""

    def __enter__(self):
        self._prev = getattr(_compile_allowed, "value", False)
        _compile_allowed.value = True

    def __exit__(self, *exc):
        _compile_allowed.value = self._prev


def get_module(device_id, variant):
    """The loaded module of `variant` on device `device_id`; built (or read from the cache
    directory) and loaded on first use in this process."""
    key = (device_id, variant)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        if CONFIG.no_compile and not getattr(_compile_allowed, "value", False):
            raise CompileDisabledError(
                f"kernel module {variant.name!r} is not loaded and MLA_CUPY_NO_COMPILE=1 forbids "
                "compiling it now; call mla_cupy.warmup(...) with this problem's shapes first"
            )
        import cupy

        _dump(variant)
        t0 = time.perf_counter()
        with cupy.cuda.Device(device_id) as dev:
            arch = variant.arch or device_arch(int(dev.compute_capability))
            build = build_cached(variant, arch)
            module = cupy.cuda.function.Module()
            module.load(build.image)
            mod = LoadedModule(module, build.lowered_names)
        logger.info("module %s ready on device %d in %.2f s", variant.name, device_id, time.perf_counter() - t0)
        _modules[key] = mod
        return mod


def probe_param_offsets(arch="compute_80"):
    """Field offsets of the C parameter structs as NVRTC lays them out (no GPU needed).

    Compiles ``_params.offset_probe_source()`` to PTX, where each field's offset is stored as a
    literal into out[k], and reads the literals back in order.
    """
    import re

    nvrtc = _nvrtc()
    src = "".join(text for _, text in _sources(COMMON_FILES))
    src += _params.offset_probe_source()
    prog = nvrtc.createProgram(src, "params_probe.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", *NVRTC_OPTIONS])
        except nvrtc.NVRTCError as exc:
            raise CompileError("NVRTC failed to compile the parameter probe", nvrtc.getProgramLog(prog)) from exc
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    consts = dict(re.findall(r"mov\.u32\s+(%r\d+),\s*(-?\d+);", ptx))
    stores = re.findall(r"st\.global\.u32\s+\[%rd\d+(?:\+(\d+))?\],\s*(%r\d+|-?\d+);", ptx)
    by_slot = {}
    for off, val in stores:
        by_slot[int(off or 0) // 4] = int(consts.get(val, val))
    return [by_slot.get(k) for k in range(len(by_slot))]
