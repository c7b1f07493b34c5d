"""Compile lane: every kernel module builds with NVRTC for sm_80 and sm_90a, no GPU needed."""

import dataclasses
import pathlib
import re

import pytest

import mla_cupy
from mla_cupy import _combine, _compile, _metadata, _params, _portable, _select
from mla_cupy.support import DTYPES, HEAD_DIMS

pytestmark = pytest.mark.compile

ARCHS = ("sm_80", "sm_90a")
VARIANTS = _select.all_variants()


def test_variant_set_covers_every_supported_problem():
    names = {v.name for v in VARIANTS}
    assert "metadata" in names
    assert len(names) == len(VARIANTS)
    for dtype in DTYPES:
        tag = {"bfloat16": "bf16", "float16": "fp16"}[dtype]
        for d, dv in HEAD_DIMS:
            assert f"combine_{tag}_dv{dv}" in names
            for m_tile in _portable.M_TILES:
                assert any(n.startswith(f"decode_{tag}_d{d}_dv{dv}_m{m_tile}_") for n in names), (dtype, d, m_tile)


# Portable variants build for every arch of the lane; an arch-specific one for its own only.
BUILDS = [(v, arch) for v in VARIANTS for arch in ((v.arch,) if v.arch else ARCHS)]


@pytest.mark.parametrize("variant,arch", BUILDS, ids=lambda x: x if isinstance(x, str) else x.name)
def test_variant_compiles(variant, arch):
    build = _compile.compile_offline(variant, arch)
    assert build.cubin[:4] == b"\x7fELF"
    assert set(build.lowered_names) == set(variant.name_expressions)
    # No kernel may spill registers or use a stack frame: both would silently cost bandwidth.
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", build.log)
    assert frames, build.log
    for frame, stores, loads in frames:
        assert (int(frame), int(stores), int(loads)) == (0, 0, 0), build.log
    # Nor may ptxas serialize wgmma (C7513-C7515: registers of an in-flight wgmma touched by
    # other instructions): the kernel would still be right, but its overlap would be gone.
    assert "wgmma.mma_async instructions are serialized" not in build.log, build.log


def test_decode_config_fits_shared_memory():
    reserved = _portable.SMEM_RESERVED_PER_CTA
    for smem_block, smem_sm in _portable.SMEM_CLASSES:
        for d, _ in HEAD_DIMS:
            for m in (1, 16, 17, 32, 33, 64, 128, 2048):
                cfg = _portable.decode_config(d, m, smem_block, smem_sm)
                assert cfg is not None
                wanted = next((t for t in _portable.M_TILES if m <= t), 64)
                if cfg.m_tile < wanted:  # only when the wanted tile cannot take two stages
                    assert _portable.decode_smem_bytes(d, wanted, 2) > smem_block
                assert 2 <= cfg.stages <= _portable.MAX_STAGES
                assert cfg.smem_bytes == _portable.decode_smem_bytes(d, cfg.m_tile, cfg.stages)
                assert cfg.smem_bytes <= smem_block
                assert cfg.ctas_per_sm * (cfg.smem_bytes + reserved) <= smem_sm
                assert cfg.ctas_per_sm == _portable.ctas_per_sm(m, smem_sm)
    # Two CTAs per SM for 16- and 32-row problems on a 228 KB SM, one for 64-row ones.
    assert _portable.ctas_per_sm(16, 233472) == 2 and _portable.ctas_per_sm(32, 233472) == 2
    assert _portable.ctas_per_sm(64, 233472) == 1
    # 64 KB is too little for any tile at head_dim 576.
    assert _portable.decode_config(576, 16, 64 * 1024) is None


def test_param_struct_offsets_match_numpy_dtypes():
    expected = [off for _, _, off in _params.expected_offsets()]
    assert _compile.probe_param_offsets() == expected


@pytest.mark.parametrize("variant", VARIANTS[:1] + VARIANTS[-1:], ids=lambda v: v.name)
def test_translation_unit_names_version_and_source_hash(variant):
    tu = variant.source()
    first = tu.splitlines()[0]
    assert mla_cupy.__version__ in first
    assert _compile.source_digest(variant.files) in first
    assert len(_compile.source_digest(variant.files)) == 64
    positions = [tu.index(f"// ---- {name} ----") for name in variant.files]
    assert positions == sorted(positions)
    # The generated layout checks follow params.cuh.
    assert positions[1] < tu.index("generated: parameter layout checks") < positions[2]


_CACHED = (_compile._source_text, _compile.source_digest, _compile.translation_unit)


def _clear_source_caches():
    for fn in _CACHED:
        fn.cache_clear()


def test_source_hash_sees_every_kernel_file(monkeypatch):
    files = _compile.kernel_files()
    assert set(files) >= set(_compile.COMMON_FILES)
    base = _compile.source_digest()
    original = _compile._source_text
    try:
        for name in files:
            edited = lambda n, name=name: original(n) + ("\n// edited\n" if n == name else "")  # noqa: E731
            _clear_source_caches()
            monkeypatch.setattr(_compile, "_source_text", edited)
            assert _compile.source_digest() != base, name
            users = [v for v in VARIANTS if name in v.files]
            for v in users[:1]:
                assert _compile.source_digest(v.files) in v.source().splitlines()[0]
        monkeypatch.undo()
    finally:
        _clear_source_caches()
    assert _compile.source_digest() == base


def test_bad_source_raises_compile_error_with_log():
    bad = _compile.Variant("bad", ("mla::decode_kernel<576, 512, 80, 2, 4, 1, 32, mla::Bf16>",),  # M_TILE 80 is rejected
                           _portable.FILES)
    with pytest.raises(_compile.CompileError) as info:
        _compile.compile_offline(bad, "sm_80")
    assert "M_TILE" in info.value.log


# ---- the library's own kernel cache (no GPU: the NVRTC-to-cache step alone) ----------------------

def _count_nvrtc_builds(monkeypatch):
    calls = []
    real = _compile._nvrtc_build

    def counting(*args, **kwargs):
        calls.append(args[0].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(_compile, "_nvrtc_build", counting)
    return calls


def test_cache_dir_takes_effect_and_a_second_build_is_a_hit(tmp_path, monkeypatch):
    monkeypatch.setattr(_compile, "CONFIG", dataclasses.replace(_compile.CONFIG, cache_dir=str(tmp_path / "cache")))
    calls = _count_nvrtc_builds(monkeypatch)
    variant = _metadata.variant()
    compiled = _compile._compiles[variant.name]  # the count tests/test_concurrency_gpu.py reads
    first = _compile.build_cached(variant, "sm_80")
    assert not first.hit and calls == [variant.name]
    assert _compile._compiles[variant.name] == compiled + 1
    assert first.path is not None and first.path.startswith(str(tmp_path / "cache"))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [pathlib.Path(first.path).name]
    assert first.image[:4] == b"\x7fELF"
    assert set(first.lowered_names) == set(variant.name_expressions)
    second = _compile.build_cached(variant, "sm_80")
    assert second.hit and calls == [variant.name]  # no NVRTC run
    assert _compile._compiles[variant.name] == compiled + 1
    assert (second.image, second.lowered_names, second.path) == (first.image, first.lowered_names, first.path)
    # Another arch is another entry.
    other = _compile.build_cached(variant, "sm_90a")
    assert not other.hit and other.path != first.path
    assert _compile.cache_location() == str(tmp_path / "cache")


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
def test_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, monkeypatch, damage):
    calls = _count_nvrtc_builds(monkeypatch)
    variant = _metadata.variant()
    path = pathlib.Path(_compile.build_cached(variant, "sm_80", tmp_path).path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    else:
        path.write_bytes(b"garbage" + data)
    with pytest.warns(RuntimeWarning, match="damaged"):
        rebuilt = _compile.build_cached(variant, "sm_80", tmp_path)
    assert not rebuilt.hit and len(calls) == 2
    assert path.read_bytes() == data  # rewritten whole
    assert _compile.build_cached(variant, "sm_80", tmp_path).hit


def test_unwritable_cache_dir_compiles_in_memory_with_one_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    directory = str(blocker / "cache")
    monkeypatch.setattr(_compile, "_unwritable", {})
    variant = _metadata.variant()
    with pytest.warns(RuntimeWarning, match="not writable"):
        build = _compile.build_cached(variant, "sm_80", directory)
    assert build.path is None and build.image[:4] == b"\x7fELF"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _compile.build_cached(_combine.variant("bfloat16", 512), "sm_80", directory).path is None


def test_cache_key_sees_source_options_arch_and_names():
    v = _metadata.variant()
    base = _compile.cache_key(v, "sm_80")
    assert _compile.cache_key(v, "sm_90a") != base
    assert _compile.cache_key(dataclasses.replace(v, options=("-lineinfo",)), "sm_80") != base
    assert _compile.cache_key(dataclasses.replace(v, files=_combine.FILES), "sm_80") != base
    assert _compile.cache_key(dataclasses.replace(v, name_expressions=()), "sm_80") != base


def test_python_constants_are_checked_by_the_compiler():
    for v in VARIANTS:
        assert v.checks, v.name
        assert "generated: constants mirrored in Python" in v.source()
    decode = next(v for v in VARIANTS if v.name.startswith("decode_"))
    assert any("::SMEM_BYTES" in expr for expr, _ in decode.checks)
    expr, value = decode.checks[0]
    wrong = dataclasses.replace(decode, checks=((expr, value + 16),))
    with pytest.raises(_compile.CompileError) as info:
        _compile.compile_offline(wrong, "sm_80")
    assert "differs from the Python side" in info.value.log
    # The cache key sees the checks too.
    assert _compile.cache_key(wrong, "sm_80") != _compile.cache_key(decode, "sm_80")
