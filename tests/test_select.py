"""Kernel selection (``_select``) and the family contract, with made-up devices: no GPU needed."""

import dataclasses
import threading
import types
import warnings

import pytest

from mla_cupy import _env, _launch, _portable, _select, _sm90
from mla_cupy._errors import UnsupportedDeviceError
from mla_cupy.scheduler import num_sm_parts

pytestmark = pytest.mark.cpu

H200 = _launch.DeviceInfo(90, 132, 232448, 233472)
A100 = _launch.DeviceInfo(80, 108, 166912, 167936)
T4 = _launch.DeviceInfo(75, 40, 65536, 65536)


@pytest.fixture(autouse=True)
def auto_kind():
    """These tests describe "auto" and forced(); MLA_CUPY_KERNEL (which the gpu lane sets to
    run once per family) must not leak into them."""
    with _select.forced("auto"):
        yield


@pytest.fixture
def device(monkeypatch):
    """Set the made-up device every device id reports: ``device(info)``."""
    def use(info):
        monkeypatch.setattr(_launch, "device_info", lambda device_id: info)
        _select._choose.cache_clear()
    yield use
    _select._choose.cache_clear()


def test_kinds_and_families_declare_the_contract():
    assert _select.KERNELS == ("auto", "portable", "sm90")
    assert _select.FAMILIES[-1] is _portable  # the family every supported GPU runs comes last
    for family in _select.FAMILIES:
        assert family.NAME in _select.KERNELS and family.NAME != "auto"
        for name in ("supports", "why_not", "variants", "all_variants", "prepare", "DecodeLaunch", "WARMUP_ROWS"):
            assert hasattr(family, name), (family.NAME, name)


def test_auto_picks_sm90_on_hopper_and_portable_elsewhere(device):
    device(H200)
    for m in (1, 16, 32, 64, 128):
        for dtype in ("bfloat16", "float16"):
            for d, dv in ((576, 512), (512, 512)):
                for page in (8, 16, 32, 64, 128, 256):
                    choice = _select.decode_choice(0, dtype, d, dv, m, page)
                    assert choice.family is _sm90, (m, dtype, d, page)
                    nq = 16 if m <= 16 else 0  # at most 16 rows: the transposed form
                    assert choice.config == _sm90.DecodeConfig(min(page, 64), _sm90.smem_bytes(d, dv), nq=nq)
        # What sm90 does not cover falls back to portable by itself.
        for d, dv, page in ((320, 256, 64), (576, 512, 1), (576, 512, 48), (576, 512, 4)):
            choice = _select.decode_choice(0, "bfloat16", d, dv, m, page)
            assert choice.family is _portable, (d, page)
            assert choice.config == _portable.decode_config(d, m, H200.smem_per_block, H200.smem_per_sm)
    device(A100)
    for m in (1, 16, 32, 64, 128):
        choice = _select.decode_choice(0, "bfloat16", 576, 512, m, 64)
        assert choice.family is _portable
        assert choice.config == _portable.decode_config(576, m, A100.smem_per_block, A100.smem_per_sm)
        assert choice.problem == _select.Problem("bfloat16", 576, 512, m, 64)


def test_forced_kind_and_its_errors(device):
    device(H200)
    with _select.forced("portable"):
        assert _select.kind() == "portable"
        assert _select.decode_choice(0, "float16", 320, 256, 16, 1).family is _portable
        assert _select.decode_choice(0, "bfloat16", 576, 512, 64, 64).family is _portable
        with _select.forced("sm90"):
            assert _select.kind() == "sm90"
            assert _select.decode_choice(0, "bfloat16", 576, 512, 64, 64).family is _sm90
            with pytest.raises(UnsupportedDeviceError, match="sm90: head_dim 320/256"):
                _select.decode_choice(0, "bfloat16", 320, 256, 64, 64)
            with pytest.raises(UnsupportedDeviceError, match="sm90: page_block_size 1 "):
                _select.decode_choice(0, "bfloat16", 576, 512, 64, 1)
        assert _select.kind() == "portable"
        seen = []  # a kind forced on this thread is not another thread's
        other = threading.Thread(target=lambda: seen.append(_select.kind()))
        other.start()
        other.join()
        assert seen == [_select.CONFIG.kernel]
    device(A100)
    with _select.forced("sm90"), pytest.raises(UnsupportedDeviceError, match=r"sm90: needs compute capability 9\.0"):
        _select.decode_choice(0, "bfloat16", 576, 512, 64, 64)
    assert _select.kind() == "auto"  # the enclosing kind (the fixture's) is back
    with pytest.raises(ValueError, match="kernel kind"):
        with _select.forced("fastest"):
            pass


def test_unsupported_device_names_why(device):
    device(T4)
    with pytest.raises(UnsupportedDeviceError, match=r"portable: compute capability 7\.5"):
        _select.decode_choice(0, "bfloat16", 576, 512, 16, 64)
    with _select.forced("portable"), pytest.raises(UnsupportedDeviceError, match="7.5"):
        _select.decode_choice(0, "bfloat16", 576, 512, 16, 64)


def test_sm_parts_follow_the_chosen_family(device):
    for info in (H200, A100):
        device(info)
        for m, h_kv in ((1, 1), (16, 1), (32, 2), (64, 1), (128, 1)):
            ctas = 1 if info is H200 else _portable.ctas_per_sm(m, info.smem_per_sm)  # sm90: one CTA per SM
            assert _select.sm_parts(0, m, h_kv) == num_sm_parts(info.sms * ctas, m, h_kv)
            with _select.forced("portable"):
                want = num_sm_parts(info.sms * _portable.ctas_per_sm(m, info.smem_per_sm), m, h_kv)
                assert _select.sm_parts(0, m, h_kv) == want


def test_a_new_family_is_one_entry(device, monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Config:
        ctas_per_sm: int = 3

    fake = types.SimpleNamespace(
        NAME="sm90", WARMUP_ROWS=(64, 128), supports=lambda dev, p: Config() if p.m >= 64 else None,
        why_not=lambda dev, p: "fewer than 64 rows", variants=lambda p, c: [], all_variants=lambda: [],
        prepare=lambda device_id, p, c: None, DecodeLaunch=None)
    monkeypatch.setattr(_select, "FAMILIES", (fake, _portable))
    device(H200)
    assert _select.decode_choice(0, "bfloat16", 576, 512, 128, 64).family is fake
    assert _select.decode_choice(0, "bfloat16", 576, 512, 16, 64).family is _portable
    assert _select.sm_parts(0, 64, 1) == num_sm_parts(132 * 3, 64, 1)
    assert _select.warmup_rows() == (16, 32, 64, 128)
    with _select.forced("sm90"), pytest.raises(UnsupportedDeviceError, match="fewer than 64 rows"):
        _select.decode_choice(0, "bfloat16", 576, 512, 16, 64)
    with _select.forced("portable"):
        assert _select.decode_choice(0, "bfloat16", 576, 512, 128, 64).family is _portable


@pytest.mark.parametrize("value,want", [("", "auto"), ("portable", "portable"), (" SM90 ", "sm90"),
                                        ("auto", "auto")])
def test_kernel_env_var(monkeypatch, value, want):
    monkeypatch.setenv("MLA_CUPY_KERNEL", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _env.read_config().kernel == want


def test_bad_kernel_env_var_warns_and_means_auto(monkeypatch):
    monkeypatch.setenv("MLA_CUPY_KERNEL", "triton")
    with pytest.warns(UserWarning, match="MLA_CUPY_KERNEL"):
        assert _env.read_config().kernel == "auto"


def test_all_variants_are_unique_and_complete():
    variants = _select.all_variants()
    names = [v.name for v in variants]
    assert len(names) == len(set(names))
    assert "metadata" in names
    assert any(n.startswith("combine_") for n in names) and any(n.startswith("decode_") for n in names)
