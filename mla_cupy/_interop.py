"""Framework interop: every conversion between the caller's arrays and CuPy lives here.

Inputs may be CuPy arrays or CUDA DLPack producers (a ``torch.Tensor`` or ``jax.Array`` on a
GPU). The framework is read from ``type(x).__module__``, so importing mla_cupy imports neither
torch nor jax; they are imported here only once such an input has been seen.

Stream of a call, first match wins: the ``stream`` argument; the current stream of the inputs'
framework (torch: ``torch.cuda.current_stream(device)``; JAX exposes none, so CuPy's); CuPy's
current stream.

Ordering, with no host sync and no copy:

* import: the producer's pending writes come before the call's stream. For JAX and other
  producers, ``cupy.from_dlpack`` runs while that stream is CuPy's current one and hands it to the
  producer's ``__dlpack__`` (DLPack's stream handshake). For torch, whose Python-level handshake
  costs ~10 us per tensor, the tensors are exported with ``torch.utils.dlpack.to_dlpack`` and the
  call's stream waits once (an event) on torch's current stream when the two differ: the same
  ordering, ~2 us per tensor.
* export (:meth:`Ctx.export`): the caller's current stream waits for the call's stream, through
  the consumer's ``from_dlpack`` handshake (JAX) or one event (torch).

The per-call fast path (:func:`signature`, :func:`current_stream_ptr`, :func:`output_factory`,
:func:`pair_factory`) serves calls whose arrays are all CuPy arrays or all torch tensors on the
current device, with no ``stream`` argument: pointers, shapes, strides and dtypes are read from
the framework's own objects, the call runs on that framework's current stream (so no event and
no handshake is needed) and results are allocated by that framework. JAX arrays on one GPU take
it too (:func:`jax_order`, :class:`JaxResults`): pointers from ``unsafe_buffer_pointer()``, a
handshake only for inputs not yet ready, CuPy's stream and results, exported through jaxlib's
DLPack import. Anything else takes the full path above.
"""

import contextlib
import dataclasses
import math
import sys

import cupy

EXPECTED_ARRAY = (
    "a CUDA array: cupy.ndarray or a CUDA DLPack producer such as a torch.Tensor or jax.Array "
    "on a GPU")

EXPECTED_STREAM = (
    "a cupy.cuda.Stream, a torch.cuda.Stream, an object with __cuda_stream__() or an int "
    "cudaStream_t address")

# DLPack device types (dlpack.h): memory a CUDA kernel can read directly.
_DL_CPU = 1
_DL_CUDA = 2
_DL_CUDA_HOST = 3
_DL_CUDA_MANAGED = 13
_CUDA_DEVICE_TYPES = (_DL_CUDA, _DL_CUDA_MANAGED)
_DEVICE_TYPE_NAMES = {_DL_CPU: "CPU", _DL_CUDA: "CUDA", _DL_CUDA_HOST: "CUDA host (pinned)",
                      _DL_CUDA_MANAGED: "CUDA managed", 10: "ROCm"}

# Top-level module of an array type -> the framework its results are returned in.
_FRAMEWORKS = {"cupy": "cupy", "torch": "torch", "jax": "jax", "jaxlib": "jax"}


def framework_of(x):
    """``"cupy"``, ``"torch"`` or ``"jax"`` from the type's module; None for anything else."""
    module = type(x).__module__ or ""
    return _FRAMEWORKS.get(module.partition(".")[0])


def _describe(x):
    t = type(x)
    module = t.__module__
    name = t.__qualname__ if module in ("builtins", None) else f"{module}.{t.__qualname__}"
    shape = getattr(x, "shape", None)
    return f"{name} of shape {tuple(shape)}" if isinstance(shape, tuple) else name


def _dlpack_device(x):
    """``(device_type, device_id)`` from ``__dlpack_device__``, or None if it cannot tell."""
    method = getattr(x, "__dlpack_device__", None)
    if method is None:
        return None
    try:
        device_type, device_id = method()
        return int(device_type), int(device_id)
    except Exception:
        return None


def is_cuda_array(x):
    """True for a CuPy array or a DLPack producer whose memory lives on a CUDA device."""
    if isinstance(x, cupy.ndarray):
        return True
    if not hasattr(x, "__dlpack__"):
        return False
    device = _dlpack_device(x)
    return device is not None and device[0] in _CUDA_DEVICE_TYPES


def device_of(x):
    """CUDA device id of a CuPy array or a CUDA DLPack producer (see :func:`is_cuda_array`)."""
    if isinstance(x, cupy.ndarray):
        return x.data.device_id
    device = _dlpack_device(x)
    if device is None or device[0] not in _CUDA_DEVICE_TYPES:
        raise TypeError(f"expected {EXPECTED_ARRAY}, got {_describe(x)}")
    return device[1]


def _check_cuda_array(name, x):
    """The device id of ``x``; TypeError naming ``name`` for anything a kernel cannot read."""
    if isinstance(x, cupy.ndarray):
        return x.data.device_id
    if not hasattr(x, "__dlpack__"):
        hint = ""
        if hasattr(x, "__array_interface__") or hasattr(x, "__array__"):
            hint = " (host memory is never copied implicitly; move it to the GPU first)"
        raise TypeError(f"{name}: expected {EXPECTED_ARRAY}, got {_describe(x)}{hint}")
    device = _dlpack_device(x)
    if device is None:
        hint = ""
        if framework_of(x) == "jax" and "Tracer" in type(x).__name__:
            hint = " (a traced value: mla_cupy runs eagerly, outside jax.jit and transforms)"
        raise TypeError(
            f"{name}: expected {EXPECTED_ARRAY}, got {_describe(x)} whose __dlpack_device__() "
            f"does not report a device{hint}")
    if device[0] not in _CUDA_DEVICE_TYPES:
        where = _DEVICE_TYPE_NAMES.get(device[0], f"DLPack device type {device[0]}")
        raise TypeError(
            f"{name}: expected {EXPECTED_ARRAY}, got {_describe(x)} in {where} memory "
            f"(host memory is never copied implicitly; move it to the GPU first)")
    return device[1]


# --------------------------------------------------------------------------------------------
# Streams.


class _StreamHandle:
    """A raw ``cudaStream_t`` in the CUDA stream protocol, keeping its owner alive."""

    __slots__ = ("ptr", "owner")

    def __init__(self, ptr, owner=None):
        self.ptr = ptr
        self.owner = owner

    def __cuda_stream__(self):
        return (0, self.ptr)


def _stream_pointer(stream):
    """``(ptr, cupy_stream_or_None)`` for the ``stream`` argument; no CUDA call is made."""
    if isinstance(stream, bool):
        raise TypeError(f"stream: expected {EXPECTED_STREAM}, got bool {stream}")
    if isinstance(stream, cupy.cuda.Stream) or (
            framework_of(stream) == "cupy" and hasattr(stream, "ptr")):
        return int(stream.ptr), stream
    if isinstance(stream, int):
        if stream < 0:
            raise ValueError(f"stream: expected a cudaStream_t address >= 0, got {stream}")
        return stream, None
    protocol = getattr(stream, "__cuda_stream__", None)
    if callable(protocol):
        result = protocol()
        if (not isinstance(result, tuple) or len(result) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in result)):
            raise TypeError(
                f"stream: expected __cuda_stream__() to return (0, address), got {result!r}")
        version, ptr = result
        if version != 0:
            raise ValueError(
                f"stream: expected __cuda_stream__() version 0, got version {version}")
        return ptr, None
    ptr = getattr(stream, "cuda_stream", None)  # torch.cuda.Stream
    if isinstance(ptr, int) and not isinstance(ptr, bool):
        return ptr, None
    raise TypeError(f"stream: expected {EXPECTED_STREAM}, got {_describe(stream)}")


def _stream_device(stream):
    """The device id a stream object says it belongs to, or None if it does not say."""
    device_id = getattr(stream, "device_id", None)  # CuPy streams; -1 means unknown
    if isinstance(device_id, int) and device_id >= 0:
        return device_id
    device = getattr(stream, "device", None)  # torch.cuda.Stream
    index = getattr(device, "index", None)
    if isinstance(index, int) and index >= 0:
        return index
    return None


# Wrappers of raw stream addresses that need no owner kept alive, per (address, device).
_WRAPPED = {}
_WRAPPED_MAX = 64


def _wrap_pointer(ptr, device_id, owner=None):
    """A CuPy stream object for a foreign ``cudaStream_t`` on ``device_id``."""
    key = (ptr, device_id)
    if owner is None and key in _WRAPPED:
        return _WRAPPED[key]
    with cupy.cuda.Device(device_id):  # from_external takes the current device's id
        wrapped = cupy.cuda.Stream.from_external(_StreamHandle(ptr, owner))
    if owner is None:
        if len(_WRAPPED) >= _WRAPPED_MAX:
            _WRAPPED.clear()
        _WRAPPED[key] = wrapped
    return wrapped


def _torch_current_stream(device_id):
    import torch

    return int(torch.cuda.current_stream(device_id).cuda_stream)


def _wait(consumer_ptr, producer_ptr):
    """Make stream ``consumer_ptr`` wait for the work queued so far on ``producer_ptr``.

    Both are streams of the current device; nothing happens when they are the same stream.
    """
    if consumer_ptr == producer_ptr:
        return
    event = cupy.cuda.Event(block=False, disable_timing=True)
    cupy.cuda.runtime.eventRecord(event.ptr, producer_ptr)
    cupy.cuda.runtime.streamWaitEvent(consumer_ptr, event.ptr)


def _resolve_stream(stream, framework, device_id):
    """``(CuPy stream of the call, torch's current stream address or None)``."""
    if stream is not None:
        ptr, cupy_stream = _stream_pointer(stream)
        said = _stream_device(stream)
        if said is not None and said != device_id:
            raise ValueError(
                f"stream: expected a stream of device {device_id} (the arrays' device), "
                f"got a stream of device {said}")
        if cupy_stream is None:
            owner = None if isinstance(stream, int) else stream
            cupy_stream = _wrap_pointer(ptr, device_id, owner)
        torch_ptr = _torch_current_stream(device_id) if framework == "torch" else None
        return cupy_stream, torch_ptr
    if framework == "torch":
        torch_ptr = _torch_current_stream(device_id)
        return _wrap_pointer(torch_ptr, device_id), torch_ptr
    # CuPy inputs, or JAX, which exposes no stream: CuPy's current stream of the device. JAX's
    # __dlpack__ makes the stream it is handed wait until the array is ready.
    return cupy.cuda.get_current_stream(device_id), None


def _torch_capsule(tensor):
    import torch.utils.dlpack

    return torch.utils.dlpack.to_dlpack(tensor)


# --------------------------------------------------------------------------------------------
# Import and export.


@contextlib.contextmanager
def _on(device_id, stream):
    """Device `device_id` current with `stream` as its current stream; on exit the caller's
    stream is current again, however it was made current (``with s:`` or ``s.use()``: leaving
    a ``with stream:`` block would restore only the former)."""
    with cupy.cuda.Device(device_id):
        previous = cupy.cuda.get_current_stream()
        stream.use()
        try:
            yield stream
        finally:
            previous.use()


@dataclasses.dataclass(frozen=True)
class Ctx:
    """Where one call runs and how its results go back to the caller.

    ``framework`` is ``"cupy"``, ``"torch"`` or ``"jax"`` (``"cupy"`` also when the only inputs
    are DLPack producers of other libraries); ``stream`` is a CuPy stream object
    (``with ctx.stream:``, ``ctx.stream.ptr``) of device ``device_id``. ``keepalive`` holds the
    caller's foreign arrays for as long as the context lives.
    """

    framework: str
    device_id: int
    stream: object
    keepalive: tuple = dataclasses.field(default=(), repr=False, compare=False)

    @contextlib.contextmanager
    def activate(self):
        """Make ``device_id`` the current device and ``stream`` its current stream."""
        with _on(self.device_id, self.stream):
            yield self.stream

    def export(self, array):
        """Return a CuPy result in the caller's array type, zero-copy (None passes through).

        The caller's current stream is made to wait for the work queued so far on ``stream``,
        so export after the last launch that writes ``array``.
        """
        if array is None or self.framework == "cupy":
            return array
        with self.activate():
            if self.framework == "torch":
                import torch.utils.dlpack

                _wait(_torch_current_stream(self.device_id), self.stream.ptr)
                return torch.utils.dlpack.from_dlpack(array.__dlpack__(stream=-1))
            import jax.dlpack

            from_dlpack = getattr(jax.dlpack, "from_dlpack", None)
            if from_dlpack is None:
                import jax.numpy

                from_dlpack = jax.numpy.from_dlpack
            return from_dlpack(array)


def import_arrays(named, stream=None):
    """Bring the caller's arrays into CuPy, zero-copy, on one device and one stream.

    Parameters
    ----------
    named : dict[str, object or None]
        Argument name -> array. None passes through as None.
    stream : optional
        A ``cupy.cuda.Stream``, a ``torch.cuda.Stream``, an object with ``__cuda_stream__()``
        or an int ``cudaStream_t`` address; None picks the inputs' framework's current stream.

    Returns
    -------
    arrays : dict[str, cupy.ndarray or None]
        Same keys, in the same order.
    ctx : Ctx
        The framework, device and stream of the call, and :meth:`Ctx.export` for results.

    Raises
    ------
    TypeError
        For an argument that is not a CUDA array (host arrays are never copied implicitly), or a
        ``stream`` of an unsupported type.
    ValueError
        For arrays of two frameworks, arrays on two devices, or a stream of another device.
    """
    # Classify everything first; nothing below touches the GPU until all checks pass.
    framework, framework_arg = None, None
    device_id, device_arg = None, None
    present = []
    for name, x in named.items():
        if x is None:
            continue
        x_device = _check_cuda_array(name, x)
        x_framework = framework_of(x)
        if x_framework is not None:
            if framework is None:
                framework, framework_arg = x_framework, name
            elif x_framework != framework:
                raise ValueError(
                    f"{framework_arg} and {name}: expected arrays of one framework, got "
                    f"{framework} ({framework_arg}) and {x_framework} ({name})")
        if device_id is None:
            device_id, device_arg = x_device, name
        elif x_device != device_id:
            raise ValueError(
                f"{device_arg} and {name}: expected arrays on one device, got device "
                f"{device_id} ({device_arg}) and device {x_device} ({name})")
        present.append(name)
    if stream is not None:
        _stream_pointer(stream)  # type check before any CUDA call
    framework = framework or "cupy"
    if device_id is None:
        device_id = cupy.cuda.runtime.getDevice()

    if framework == "torch":
        _register_torch()
    elif framework == "jax":
        _register_jax(type(named[framework_arg]))
    ctx_stream, torch_ptr = _resolve_stream(stream, framework, device_id)
    arrays = dict(named)
    foreign = [name for name in present if not isinstance(named[name], cupy.ndarray)]
    if foreign:
        with _on(device_id, ctx_stream):
            if torch_ptr is not None:
                _wait(ctx_stream.ptr, torch_ptr)
            for name in foreign:
                x = named[name]
                if framework_of(x) == "torch":
                    arrays[name] = cupy.from_dlpack(_torch_capsule(x))
                else:  # the DLPack handshake orders x before CuPy's current stream: ours
                    arrays[name] = cupy.from_dlpack(x)
    keepalive = tuple(named[name] for name in foreign)
    return arrays, Ctx(framework, device_id, ctx_stream, keepalive)


# --------------------------------------------------------------------------------------------
# The per-call fast path: no DLPack, no CuPy wrappers of foreign arrays.

current_device = cupy.cuda.runtime.getDevice


def _cupy_signature(arrays, array_type):
    key, pointers, device = [], [], None
    for x in arrays:
        if x is None:
            key.append(None)
            pointers.append(0)
            continue
        if type(x) is not array_type:
            return None
        memory = x.data
        ptr, x_device = memory.ptr, memory.device_id
        if device is None:
            device = x_device
        elif x_device != device:
            return None
        key.append((x.shape, x.strides, x.dtype, ptr & 15))
        pointers.append(ptr)
    return "cupy", (array_type, device, *key), pointers, device


def _torch_signature(arrays, array_type):
    key, pointers, device = [], [], None
    for x in arrays:
        if x is None:
            key.append(None)
            pointers.append(0)
            continue
        if type(x) is not array_type or not x.is_cuda:
            return None
        ptr, x_device = x.data_ptr(), x.get_device()
        if device is None:
            device = x_device
        elif x_device != device:
            return None
        key.append((x.shape, x.stride(), x.dtype, ptr & 15))
        pointers.append(ptr)
    return "torch", (array_type, device, *key), pointers, device


# Exact array type -> its signature reader. torch.Tensor is added once a torch tensor has taken
# the full path (so importing mla_cupy never imports torch); subclasses are not included.
_SIGNATURES = {cupy.ndarray: _cupy_signature}


def signature(arrays):
    """``(framework, key, pointers, device_id)`` of a call's arrays (a sequence; None entries
    allowed, the first one not None), or None when the fast path cannot tell.

    ``key`` holds everything the validators and the launch plan look at in each array (type,
    device, shape, strides, dtype, the pointer's offset from 16 bytes), so two calls with equal
    keys pass or fail the same checks; ``pointers`` are the data pointers (0 for None). None for
    arrays of several types or devices, torch tensors off the GPU, unknown types, or anything that
    raises while being read.
    """
    array_type = type(arrays[0])
    reader = _SIGNATURES.get(array_type)
    if reader is None:
        return None
    try:
        return reader(arrays, array_type)
    except Exception:  # e.g. a sparse tensor's stride(): the full path names the problem
        return None


def _register_torch():
    torch = sys.modules.get("torch")  # already imported by whoever made the tensors
    tensor = getattr(torch, "Tensor", None)
    if isinstance(tensor, type):
        _SIGNATURES[tensor] = _torch_signature


def _jax_signature(arrays, array_type):
    # A jax.Array in one GPU's memory: its buffer's pointer, shape, dtype and layout (JAX's
    # default is row-major; an array given another layout under jax.jit gets a key of its own).
    key, pointers, device = [], [], None
    for x in arrays:
        if x is None:
            key.append(None)
            pointers.append(0)
            continue
        if type(x) is not array_type:
            return None
        sharding = x.sharding
        x_device = _JAX_ORDINALS.get(sharding, -1)
        if x_device == -1:
            x_device = _jax_ordinal(sharding)
        if x_device is None:
            return None
        if device is None:
            device = x_device
        elif x_device != device:
            return None
        ptr = x.unsafe_buffer_pointer()  # raises for a deleted array: the full path says so
        shape = x.shape
        key.append((shape, x.dtype, ptr & 15, x._pjrt_layout if len(shape) > 1 else None))
        pointers.append(ptr)
    return "jax", (array_type, device, *key), pointers, device


_JAX_ORDINALS = {}  # JAX sharding -> the CUDA ordinal of its one GPU (None: anything else)


def _jax_ordinal(sharding):
    devices = sharding.device_set
    ordinal = None
    if len(devices) == 1 and getattr(sharding, "memory_kind", None) in (None, "device"):
        device, = devices
        if device.platform == "gpu":
            ordinal = device.local_hardware_id
    if len(_JAX_ORDINALS) >= 64:
        _JAX_ORDINALS.clear()
    _JAX_ORDINALS[sharding] = ordinal
    return ordinal


def _register_jax(array_type):
    """Read jax.Array's type `array_type` on the fast path (the exact type a call's first JAX
    argument had; JAX's own array class, never a tracer)."""
    jax = sys.modules.get("jax")
    base = getattr(jax, "Array", None)
    if isinstance(base, type) and issubclass(array_type, base) and "Tracer" not in array_type.__name__:
        _SIGNATURES[array_type] = _jax_signature


def jax_order(arrays, stream_ptr):
    """Make stream `stream_ptr` wait for JAX's pending writes of `arrays` (None entries
    allowed): DLPack's handshake for each array not ready yet, its capsule dropped at once."""
    for x in arrays:
        if x is not None and not x.is_ready():
            x.__dlpack__(stream=stream_ptr or _CU_STREAM_LEGACY)


_CU_STREAM_LEGACY = 1  # DLPack's (and the driver's) name of the legacy default stream


class JaxResults:
    """CuPy results -> jax.Arrays on the same memory, on JAX device `device_id`: JAX's stream for
    external ready events waits for the CuPy stream current at export (DLPack's handshake, CuPy
    the producer). Through jaxlib's DLPack import itself where this JAX has it (what
    ``jax.dlpack.from_dlpack`` calls, without its ~20 µs of Python around it), else through
    ``jax.dlpack.from_dlpack``."""

    def __init__(self, device_id):
        import jax

        self.device = next(d for d in jax.devices("gpu") if d.local_hardware_id == device_id)
        self.to_buffer = None
        try:
            from jax._src.lib import _jax, jaxlib_extension_version

            if jaxlib_extension_version >= 467:
                self.to_buffer = _jax.dlpack_managed_tensor_to_buffer
        except Exception:  # noqa: BLE001 - another JAX: the public import
            pass
        self.public = jax.dlpack.from_dlpack
        self.array_type = jax.Array

    def __call__(self, array):
        if self.to_buffer is not None:
            try:
                stream = self.device.get_stream_for_external_ready_events()
                result = self.to_buffer(array.__dlpack__(stream=stream), self.device, stream, None, _DL_CUDA)
                if isinstance(result, self.array_type):
                    return result
            except Exception:  # noqa: BLE001 - not the import this code knows: the public one from now on
                pass
            self.to_buffer = None
        return self.public(array)


def current_stream_ptr(framework, device_id):
    """Address of the current stream of `framework` ("cupy", "torch" or "jax", whose calls run
    on CuPy's) on `device_id`."""
    if framework == "torch":
        return _torch_raw_stream()(device_id)
    return cupy.cuda.get_current_stream(device_id).ptr


_torch_stream_getter = []


def _torch_raw_stream():
    """torch's cheapest reader of its current stream's address: the raw-stream getter of its
    C extension where it exists (what compilers built on torch call), else the public API."""
    if not _torch_stream_getter:
        import torch

        getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if getter is None:
            getter = _torch_current_stream
        _torch_stream_getter.append(getter)
    return _torch_stream_getter[0]


def output_factory(framework, device_id, shape, dtype_name):
    """A function of no arguments returning ``(array, device pointer)``: a new C-contiguous
    array of `shape` and `dtype_name` in `framework` ("cupy" or "torch"), on `device_id` (the
    current device) and allocated for use on the framework's current stream."""
    if framework == "torch":
        import torch

        dtype, device = getattr(torch, dtype_name), torch.device("cuda", device_id)
        empty = torch.empty

        def make():
            x = empty(shape, dtype=dtype, device=device)
            return x, x.data_ptr()
        return make
    dtype = cupy.dtype(dtype_name)
    empty = cupy.empty

    def make():
        x = empty(shape, dtype=dtype)
        return x, x.data.ptr
    return make


_RESULT_ALIGN = 256  # the second result's offset in a shared allocation (cudaMalloc's alignment)


def pair_factory(framework, device_id, first, second):
    """A function of no arguments returning ``(a, a pointer, b, b pointer)``: two new
    C-contiguous arrays, `first` and `second` each given as ``(shape, dtype name)``, as
    :func:`output_factory` makes them (a decode call's out and lse, get_mla_metadata's two
    results). CuPy's two share one allocation (one pool request instead of two: the memory
    returns to the pool when both arrays are gone)."""
    (a_shape, a_dtype_name), (b_shape, b_dtype_name) = first, second
    if framework == "torch":
        new_a = output_factory(framework, device_id, a_shape, a_dtype_name)
        new_b = output_factory(framework, device_id, b_shape, b_dtype_name)

        def make_pair():
            return (*new_a(), *new_b())
        return make_pair
    a_dtype, b_dtype = cupy.dtype(a_dtype_name), cupy.dtype(b_dtype_name)
    b_offset = -(-a_dtype.itemsize * math.prod(a_shape) // _RESULT_ALIGN) * _RESULT_ALIGN
    total = max(b_offset + b_dtype.itemsize * math.prod(b_shape), 1)
    alloc, ndarray = cupy.cuda.alloc, cupy.ndarray

    def make_pair():
        memory = alloc(total)
        b_memory = memory + b_offset
        return (ndarray(a_shape, a_dtype, memory), memory.ptr,
                ndarray(b_shape, b_dtype, b_memory), b_memory.ptr)
    return make_pair
