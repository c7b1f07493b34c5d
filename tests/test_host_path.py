"""The lean per-call host path without a GPU: launch-configuration byte layout, parameter
images, kernel launch through a stand-in driver, fast-path signature keys.

tests/test_host_path_gpu.py runs the same path on a GPU against the reference.
"""

import ctypes
import struct

import numpy as np
import pytest

from mla_cupy import _launch, _params

pytestmark = pytest.mark.cpu


def test_launch_config_matches_cuda_h():
    assert ctypes.sizeof(_launch.LaunchConfig) == 56
    assert _launch.LaunchConfig.grid.offset == 0
    assert _launch.LaunchConfig.block.offset == 12
    assert _launch.LaunchConfig.shared_bytes.offset == 24
    assert _launch.LaunchConfig.stream.offset == 32
    assert _launch.LaunchConfig.attrs.offset == 40
    assert _launch.LaunchConfig.num_attrs.offset == 48
    assert ctypes.sizeof(_launch.LaunchAttribute) == 72
    assert _launch.LaunchAttribute.id.offset == 0
    assert _launch.LaunchAttribute.value.offset == 8


COMBINE_STATIC = dict(o_stride_b=1, o_stride_s=2, o_stride_h=3, lse_stride_b=4, lse_stride_h=5, lse_stride_s=6,
                      batch=7, h_kv=8, ngroups=9, m=10)


def test_block_writes_only_the_pointers():
    block = _params.Block(_params.COMBINE_PARAMS, ("num_splits", "o_accum", "lse_accum", "out", "lse"),
                          **COMBINE_STATIC)
    block.set((11, 12, 13, 14, 2**64 - 16))
    want = dict(num_splits=11, o_accum=12, lse_accum=13, out=14, lse=2**64 - 16, **COMBINE_STATIC)
    assert block.fields() == want
    # Same bytes as the per-call Template packing.
    template = _params.Template(_params.COMBINE_PARAMS, **COMBINE_STATIC)
    packed = template.pack(num_splits=11, o_accum=12, lse_accum=13, out=14, lse=2**64 - 16)
    assert bytes(packed) == block.buffer.raw
    block.set((1, 2, 3, 4, 5))
    assert block.fields()["o_stride_b"] == 1 and block.fields()["lse"] == 5
    assert len(block.buffer.raw) == _params.COMBINE_PARAMS.itemsize


def test_block_decode_and_metadata_layouts():
    static = {f: i + 100 for i, f in enumerate(_params.DECODE_PARAMS.names)
              if f not in _params.DECODE_POINTERS and f != "pad0" and f != "scale_log2"}
    block = _params.Block(_params.DECODE_PARAMS, _params.DECODE_POINTERS, scale_log2=1.5, **static)
    block.set(tuple(range(1000, 1010)))
    got = block.fields()
    assert [got[f] for f in _params.DECODE_POINTERS] == list(range(1000, 1010))
    assert got["scale_log2"] == 1.5 and all(got[f] == v for f, v in static.items())
    meta = _params.Block(_params.METADATA_PARAMS, ("seqlens", "sched", "num_splits"), batch=3, num_sm_parts=4,
                         block_tokens=64, fixed_overhead=5)
    meta.set((7, 8, 9))
    assert meta.fields() == dict(seqlens=7, sched=8, num_splits=9, batch=3, num_sm_parts=4, block_tokens=64,
                                 fixed_overhead=5)


POINTERS = ("num_splits", "o_accum", "lse_accum", "out", "lse")


@pytest.mark.parametrize("dynamic, static", [
    (("o_accum", "num_splits", "lse_accum", "out", "lse"), COMBINE_STATIC),  # out of struct order
    (("num_splits", "lse_accum", "o_accum", "out", "lse"), COMBINE_STATIC),  # not consecutive
    (POINTERS, dict(COMBINE_STATIC, num_splits=1)),  # a field given twice
    (POINTERS[:4], COMBINE_STATIC),  # a field given nowhere
    (POINTERS, dict(COMBINE_STATIC, nonsense=1)),  # an unknown field
    (("m",), dict(COMBINE_STATIC, **dict.fromkeys(POINTERS, 0), m=None)),  # not a pointer
])
def test_block_refuses_bad_field_sets(dynamic, static):
    static = {k: v for k, v in static.items() if v is not None}
    with pytest.raises(ValueError):
        _params.Block(_params.COMBINE_PARAMS, dynamic, **static)


class FakeFunction:
    ptr = 0xF00D

    def __init__(self):
        self.calls = []

    def __call__(self, grid, block, args, shared, stream):
        self.calls.append((grid, block, [bytes(a) for a in args], shared, stream.ptr))


def _combine_block():
    return _params.Block(_params.COMBINE_PARAMS, ("num_splits", "o_accum", "lse_accum", "out", "lse"),
                         **COMBINE_STATIC)


def test_kernel_driver_launch_reads_config_and_arguments(monkeypatch):
    seen = []

    def fake_launch_ex(config, fn, argv, extra):
        cfg = _launch.LaunchConfig.from_address(config)
        args = (ctypes.c_void_p * 2).from_address(argv)
        raw_cfg = ctypes.string_at(config, 56)
        seen.append(dict(grid=tuple(cfg.grid), block=tuple(cfg.block), shared=cfg.shared_bytes,
                         stream=struct.unpack_from("<Q", raw_cfg, 32)[0], attrs=cfg.attrs, n=cfg.num_attrs,
                         fn=fn, params=ctypes.string_at(args[0], _params.COMBINE_PARAMS.itemsize),
                         extra=ctypes.string_at(args[1], 4), extra_arg=extra))
        return 0

    monkeypatch.setattr(_launch, "_launch_kernel_ex", lambda: fake_launch_ex)
    block = _combine_block()
    kernel = _launch.Kernel(FakeFunction(), (5, 2), (256,), 4096, block, extra=1)
    image = np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint8).copy()
    for stream in (0, 0xABC, 0xABC, 2):
        kernel(stream, (11, 12, 13, 14, 15), ((image.ctypes.data, image),))
    assert [c["stream"] for c in seen] == [0, 0xABC, 0xABC, 2]
    first = seen[0]
    assert first["grid"] == (5, 2, 1) and first["block"] == (256, 1, 1) and first["shared"] == 4096
    assert first["attrs"] is None and first["n"] == 0 and first["fn"] == 0xF00D and first["extra_arg"] is None
    assert struct.unpack_from("<5Q", first["params"]) == (11, 12, 13, 14, 15)
    assert first["params"][40:] == block.buffer.raw[40:]
    assert first["extra"] == b"\x01\x02\x03\x04"


def test_programmatic_kernel_passes_the_serialization_attribute(monkeypatch):
    seen = []

    def fake_launch_ex(config, fn, argv, extra):
        cfg = _launch.LaunchConfig.from_address(config)
        if not cfg.num_attrs:
            seen.append((cfg.stream or 0, 0))
            return 0
        attr = _launch.LaunchAttribute.from_address(cfg.attrs)
        seen.append((cfg.stream, cfg.num_attrs, attr.id, struct.unpack_from("<i", bytes(attr.value))[0]))
        return 0

    monkeypatch.setattr(_launch, "_launch_kernel_ex", lambda: fake_launch_ex)
    kernel = _launch.Kernel(FakeFunction(), (1,), (32,), 0, _combine_block(), programmatic=True)
    for stream in (0x10, 0x20, 0, 1, 2, 0x20):
        kernel(stream, (1, 2, 3, 4, 5))
    # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (6) with programmaticStreamSerializationAllowed = 1,
    # except on the default streams (0, cudaStreamLegacy, cudaStreamPerThread): an ordinary launch there.
    assert seen == [(0x10, 1, 6, 1), (0x20, 1, 6, 1), (0, 0), (1, 0), (2, 0), (0x20, 1, 6, 1)]


def test_pdl_switch(monkeypatch):
    from mla_cupy import _env

    for value, want in (("", True), ("1", True), ("0", False), ("off", False)):
        monkeypatch.setenv("MLA_CUPY_PDL", value)
        assert _env.read_config().pdl is want
    monkeypatch.delenv("MLA_CUPY_PDL")
    assert _env.read_config().pdl is True


def test_kernel_driver_error_is_raised(monkeypatch):
    monkeypatch.setattr(_launch, "_launch_kernel_ex", lambda: lambda *args: 1)
    kernel = _launch.Kernel(FakeFunction(), (1,), (32,), 0, _combine_block())
    errors = []

    class FakeError(Exception):
        def __init__(self, rc):
            errors.append(rc)

    import cupy_backends.cuda.api.driver as driver

    monkeypatch.setattr(driver, "CUDADriverError", FakeError)
    with pytest.raises(FakeError):
        kernel(0, (1, 2, 3, 4, 5))
    assert errors == [1]


def test_kernel_without_the_driver_entry_uses_the_cupy_call(monkeypatch):
    monkeypatch.setattr(_launch, "_launch_kernel_ex", lambda: None)
    fn = FakeFunction()
    kernel = _launch.Kernel(fn, (3,), (64,), 128, _combine_block(), extra=1)
    image = np.arange(16, dtype=np.uint8)
    kernel(0x55, (1, 2, 3, 4, 5), ((image.ctypes.data, image),))
    grid, block, args, shared, stream = fn.calls[0]
    assert grid == (3, 1, 1) and block == (64, 1, 1) and shared == 128 and stream == 0x55
    assert struct.unpack_from("<5Q", args[0]) == (1, 2, 3, 4, 5) and args[1] == image.tobytes()


# ---- fast-path signatures ------------------------------------------------------------------------

class FakeTensor:
    """A torch.Tensor stand-in with the attributes the torch signature reader uses."""

    def __init__(self, shape, stride, dtype="bf16", ptr=0x1000, device=0, cuda=True):
        self.shape, self._stride, self.dtype = tuple(shape), stride and tuple(stride), dtype
        self._ptr, self._device, self.is_cuda = ptr, device, cuda

    def data_ptr(self):
        return self._ptr

    def stride(self):
        if self._stride is None:
            raise RuntimeError("sparse tensors do not have strides")
        return self._stride

    def get_device(self):
        return self._device


@pytest.fixture
def fake_torch_registered(monkeypatch):
    from mla_cupy import _interop

    monkeypatch.setitem(_interop._SIGNATURES, FakeTensor, _interop._torch_signature)
    return _interop


def test_torch_signature_reads_pointers_and_key(fake_torch_registered):
    interop = fake_torch_registered
    q = FakeTensor((2, 1, 16, 576), (9216, 9216, 576, 1), ptr=0x2000)
    kc = FakeTensor((8, 64, 1, 576), (36864, 576, 576, 1), ptr=0x9000)
    framework, key, pointers, device = interop.signature((q, kc, None))
    assert framework == "torch" and device == 0 and pointers == [0x2000, 0x9000, 0]
    again = interop.signature((FakeTensor(q.shape, q._stride, ptr=0x4000), FakeTensor(kc.shape, kc._stride, ptr=0x7770),
                               None))
    assert again[1] == key and again[2] == [0x4000, 0x7770, 0]


@pytest.mark.parametrize("change", [
    dict(shape=(2, 1, 16, 512)), dict(stride=(9216, 9216, 1152, 1)), dict(dtype="fp16"), dict(ptr=0x2008),
    dict(device=1, other_device=1),
])
def test_torch_signature_key_sees_every_checked_property(fake_torch_registered, change):
    interop = fake_torch_registered
    base = dict(shape=(2, 1, 16, 576), stride=(9216, 9216, 576, 1), dtype="bf16", ptr=0x2000, device=0)
    other_device = change.pop("other_device", 0)
    a = interop.signature((FakeTensor(**base), FakeTensor((4,), (1,), "i32", 0x100, 0)))
    b = interop.signature((FakeTensor(**dict(base, **change)), FakeTensor((4,), (1,), "i32", 0x100, other_device)))
    assert a[1] != b[1]


def test_torch_signature_declines(fake_torch_registered):
    interop = fake_torch_registered
    t = FakeTensor((4,), (1,))
    assert interop.signature((t, FakeTensor((4,), (1,), device=1))) is None  # two devices
    assert interop.signature((t, FakeTensor((4,), (1,), cuda=False))) is None  # host tensor
    assert interop.signature((t, FakeTensor((4,), None))) is None  # raises while read
    assert interop.signature((t, np.zeros(4))) is None  # mixed types
    assert interop.signature((np.zeros(4), t)) is None  # unknown type
    sub = type("Parameter", (FakeTensor,), {})
    assert interop.signature((sub((4,), (1,)),)) is None  # subclasses are not read


def test_register_torch_needs_the_real_module(monkeypatch):
    import sys

    from mla_cupy import _interop

    monkeypatch.setitem(sys.modules, "torch", type(sys)("torch"))  # no Tensor attribute
    before = dict(_interop._SIGNATURES)
    _interop._register_torch()
    assert _interop._SIGNATURES == before


class FakeJaxDevice:
    def __init__(self, ordinal, platform="gpu"):
        self.local_hardware_id, self.platform = ordinal, platform


class FakeSharding:
    def __init__(self, *devices, memory_kind="device"):
        self.device_set, self.memory_kind = frozenset(devices), memory_kind


GPU0, GPU1, HOST = FakeJaxDevice(0), FakeJaxDevice(1), FakeJaxDevice(0, "cpu")
ON_0, ON_1 = FakeSharding(GPU0), FakeSharding(GPU1)


class FakeJaxArray:
    """A jax.Array stand-in with what the JAX signature reader and jax_order use."""

    def __init__(self, shape, dtype="bf16", ptr=0x1000, sharding=ON_0, ready=True, layout="{3,2,1,0}"):
        self.shape, self.dtype, self._ptr, self.sharding, self._ready = tuple(shape), dtype, ptr, sharding, ready
        self._pjrt_layout = layout
        self.handshakes = []

    def unsafe_buffer_pointer(self):
        return self._ptr

    def is_ready(self):
        return self._ready

    def __dlpack__(self, stream=None):
        self.handshakes.append(stream)
        return object()


@pytest.fixture
def fake_jax_registered(monkeypatch):
    from mla_cupy import _interop

    monkeypatch.setitem(_interop._SIGNATURES, FakeJaxArray, _interop._jax_signature)
    monkeypatch.setattr(_interop, "_JAX_ORDINALS", {})
    return _interop


def test_jax_signature_reads_pointers_and_key(fake_jax_registered):
    interop = fake_jax_registered
    q, kc = FakeJaxArray((2, 1, 16, 576), ptr=0x2000), FakeJaxArray((8, 64, 1, 576), ptr=0x9000)
    framework, key, pointers, device = interop.signature((q, kc, None))
    assert framework == "jax" and device == 0 and pointers == [0x2000, 0x9000, 0]
    again = interop.signature((FakeJaxArray(q.shape, ptr=0x4000), FakeJaxArray(kc.shape, ptr=0x7770), None))
    assert again[1] == key and again[2] == [0x4000, 0x7770, 0]
    on_1 = interop.signature((FakeJaxArray(q.shape, sharding=ON_1), FakeJaxArray(kc.shape, sharding=ON_1)))
    assert on_1[3] == 1 and on_1[1] != key


@pytest.mark.parametrize("change", [dict(shape=(2, 1, 16, 512)), dict(dtype="fp16"), dict(ptr=0x2008),
                                    dict(layout="{0,1,2,3}")])
def test_jax_signature_key_sees_every_checked_property(fake_jax_registered, change):
    interop = fake_jax_registered
    base = dict(shape=(2, 1, 16, 576), dtype="bf16", ptr=0x2000)
    assert interop.signature((FakeJaxArray(**base),))[1] != interop.signature((FakeJaxArray(**dict(base, **change)),))[1]


def test_jax_signature_declines(fake_jax_registered):
    interop = fake_jax_registered
    x = FakeJaxArray((4,))
    assert interop.signature((x, FakeJaxArray((4,), sharding=ON_1))) is None  # two devices
    assert interop.signature((x, FakeJaxArray((4,), sharding=FakeSharding(HOST)))) is None  # a CPU array
    assert interop.signature((x, FakeJaxArray((4,), sharding=FakeSharding(GPU0, GPU1)))) is None  # sharded
    pinned = FakeSharding(GPU0, memory_kind="pinned_host")
    assert interop.signature((x, FakeJaxArray((4,), sharding=pinned))) is None  # host memory of a GPU
    assert interop.signature((x, np.zeros(4))) is None  # mixed types
    deleted = FakeJaxArray((4,))
    deleted.unsafe_buffer_pointer = lambda: (_ for _ in ()).throw(RuntimeError("Array has been deleted"))
    assert interop.signature((x, deleted)) is None  # raises while read


def test_jax_order_handshakes_only_arrays_not_ready(fake_jax_registered):
    interop = fake_jax_registered
    ready, pending = FakeJaxArray((4,)), FakeJaxArray((4,), ready=False)
    interop.jax_order((ready, None, pending), 0x77)
    assert ready.handshakes == [] and pending.handshakes == [0x77]
    interop.jax_order((pending,), 0)  # CuPy's legacy default stream: DLPack's 1, not 0
    assert pending.handshakes == [0x77, 1]


def test_register_jax_takes_only_jax_array_types(monkeypatch):
    import sys

    from mla_cupy import _interop

    fake_jax = type(sys)("jax")
    fake_jax.Array = type("Array", (), {})
    monkeypatch.setitem(sys.modules, "jax", fake_jax)
    monkeypatch.setattr(_interop, "_SIGNATURES", dict(_interop._SIGNATURES))
    impl = type("ArrayImpl", (fake_jax.Array,), {})
    tracer = type("DynamicJaxprTracer", (fake_jax.Array,), {})
    _interop._register_jax(tracer)
    _interop._register_jax(FakeJaxArray)  # not a jax.Array
    assert tracer not in _interop._SIGNATURES and FakeJaxArray not in _interop._SIGNATURES
    _interop._register_jax(impl)
    assert _interop._SIGNATURES[impl] is _interop._jax_signature


@pytest.mark.parametrize("ctas", [1, 64, 132, 133, 264, 500, 923, 924, 1056, 5000])
def test_programmatic_combine_spreads_over_the_sms(ctas):
    from mla_cupy import _combine

    info = _launch.DeviceInfo(cc=90, sms=132, smem_per_block=232448, smem_per_sm=233472)
    shared = _combine._spread_bytes(info, ctas)
    per_sm = -(-ctas // info.sms)
    if per_sm >= _combine.CTAS_PER_SM:  # the register budget already allows no more
        assert shared == 0
        return
    fits = info.smem_per_sm // (shared + _combine._SMEM_RESERVED)
    assert fits == per_sm and shared <= info.smem_per_block
