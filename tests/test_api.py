"""The public surface: exports, warmup(), show_config(), MLA_CUPY_NO_COMPILE."""

import io
import os
import subprocess
import sys
import textwrap

import pytest

import mla_cupy
from mla_cupy import _select

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.cpu
def test_public_names():
    assert sorted(mla_cupy.__all__) == sorted(
        ["get_mla_metadata", "flash_mla_with_kvcache", "warmup", "show_config", "__version__",
         "UnsupportedDeviceError", "CompileError", "CompileDisabledError",
         "WorkspaceOutOfMemoryError"])
    for name in mla_cupy.__all__:
        assert getattr(mla_cupy, name) is not None


@pytest.mark.cpu
def test_public_exceptions():
    assert issubclass(mla_cupy.UnsupportedDeviceError, RuntimeError)
    assert issubclass(mla_cupy.CompileError, RuntimeError)
    assert issubclass(mla_cupy.CompileDisabledError, RuntimeError)
    assert issubclass(mla_cupy.WorkspaceOutOfMemoryError, RuntimeError)
    assert issubclass(mla_cupy.WorkspaceOutOfMemoryError, MemoryError)
    assert mla_cupy.CompileError("failed", "the log").log == "the log"


@pytest.mark.cpu
def test_show_config_reports_versions_and_cache_dir():
    buf = io.StringIO()
    mla_cupy.show_config(file=buf)
    text = buf.getvalue()
    assert f"mla_cupy {mla_cupy.__version__}" in text
    assert "kernel cache dir:" in text
    assert "CuPy" in text


@pytest.mark.cpu
def test_cache_dir_comes_from_the_environment(tmp_path):
    code = """
        import mla_cupy
        from mla_cupy import _compile
        print("DIR", _compile.cache_dir())
        mla_cupy.show_config()
    """
    env = {k: v for k, v in os.environ.items() if k not in ("MLA_CUPY_CACHE_DIR", "XDG_CACHE_HOME")}
    chosen = str(tmp_path / "chosen")
    proc = _run(code, base=env, MLA_CUPY_CACHE_DIR=chosen)
    assert proc.returncode == 0, proc.stderr
    assert f"DIR {chosen}\n" in proc.stdout and f"kernel cache dir: {chosen}" in proc.stdout
    proc = _run(code, base=env, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert f"DIR {tmp_path / 'xdg' / 'mla_cupy'}\n" in proc.stdout, proc.stdout + proc.stderr
    proc = _run(code, base=env, HOME=str(tmp_path / "home"))
    assert f"DIR {tmp_path / 'home' / '.cache' / 'mla_cupy'}\n" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.cpu
@pytest.mark.parametrize("kwargs,name", [
    (dict(head_dims=[(576, 256)]), "head_dims"),
    (dict(dtypes=["float32"]), "dtypes"),
    (dict(num_q_tokens_per_head_k=0), "num_q_tokens_per_head_k"),
])
def test_warmup_rejects_bad_arguments_before_touching_the_gpu(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mla_cupy.warmup(**kwargs)


@pytest.mark.gpu
def test_warmup_compiles_a_decode_step():
    seconds = mla_cupy.warmup(head_dims=[(576, 512)], dtypes=["bfloat16"], num_q_tokens_per_head_k=128)
    assert "metadata" in seconds
    # The modules of the family the selection picks for that problem on this GPU (page 64).
    choice = _select.decode_choice(0, "bfloat16", 576, 512, 128, 64)
    wanted = {v.name for v in choice.family.variants(choice.problem, choice.config)}
    assert wanted <= set(seconds), (wanted, seconds)
    assert all(t >= 0 for t in seconds.values())


def _run(code, base=None, **env):
    base = os.environ if base is None else base
    full_env = dict(base, PYTHONPATH=ROOT + os.pathsep + base.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.gpu
def test_no_compile_switch_allows_only_warmed_kernels():
    code = """
        import cupy, numpy as np
        import mla_cupy
        from mla_cupy import CompileDisabledError
        from mla_cupy.testing import make_decode_inputs
        inp = make_decode_inputs(2, 1, 16, seqlens=[100, 300], seed=1)
        q, kc, bt, sl = (cupy.asarray(x) for x in (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens))
        try:
            mla_cupy.get_mla_metadata(sl, 16, 1)
        except CompileDisabledError as exc:
            print("refused:", exc)
        else:
            raise SystemExit("compiled although MLA_CUPY_NO_COMPILE=1")
        mla_cupy.warmup(head_dims=[(576, 512)], dtypes=["bfloat16"], num_q_tokens_per_head_k=16)
        sched, splits = mla_cupy.get_mla_metadata(sl, 16, 1)
        out, lse = mla_cupy.flash_mla_with_kvcache(q, kc, bt, sl, 512, sched, splits, causal=True)
        cupy.cuda.Device().synchronize()
        print("OK", out.shape)
    """
    proc = _run(code, MLA_CUPY_NO_COMPILE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "refused:" in proc.stdout and "OK" in proc.stdout, proc.stdout
