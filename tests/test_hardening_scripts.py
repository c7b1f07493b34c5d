"""The serving-hardening scripts without a GPU: the sanitizer cases are valid edge problems,
scripts/sanitize.sh counts each tool's errors and fails on any, and scripts/long_run.py judges
memory growth as it says."""

import importlib.util
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mla_cupy.reference import flash_mla_with_kvcache_reference
from mla_cupy.scheduler import schedule
from mla_cupy.testing import BLOCK_TABLE_SENTINEL

pytestmark = pytest.mark.cpu

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sanitize_cases():
    return _script("sanitize_cases")


@pytest.fixture(scope="module")
def long_run():
    return _script("long_run")


def test_sanitizer_cases_cover_the_edges(sanitize_cases):
    cases = sanitize_cases.CASES
    assert len({c.name for c in cases}) == len(cases)
    pages = {c.page for c in cases}
    assert {1, 256} <= pages and len(pages) >= 3
    lengths = {n for c in cases for n in c.seqlens}
    assert {0, 1} <= lengths
    assert any(n % c.page for c in cases for n in c.seqlens if c.page > 1), "no partly filled last page"
    assert {c.dtype for c in cases} == {"bfloat16", "float16"}
    assert any(c.causal and c.s_q > 1 and min(c.seqlens) < c.s_q for c in cases)
    assert any(c.tails for c in cases) and any(c.extra_columns for c in cases)
    assert any(c.h_kv > 1 for c in cases) and any(len(c.seqlens) == 1 and c.seqlens[0] > 4096 for c in cases)


def test_sanitizer_cases_are_valid_problems(sanitize_cases):
    for i, case in enumerate(sanitize_cases.CASES):
        inp = sanitize_cases.make_inputs(case, i)
        assert inp.q.shape == (len(case.seqlens), case.s_q, case.h_q, 576) and inp.q.dtype.name == case.dtype
        assert inp.block_table.flags.c_contiguous and inp.block_table.dtype == np.int32
        used = -(-inp.cache_seqlens // case.page)
        for row, tail in enumerate(case.tails):  # each row's tail holds the value asked for
            want = BLOCK_TABLE_SENTINEL if tail is None else tail
            width = inp.block_table.shape[1] - case.extra_columns
            assert (inp.block_table[row, used[row]:width] == want).all()
        if case.extra_columns:
            assert (inp.block_table[:, -case.extra_columns:] == -1).all()
        out, lse = flash_mla_with_kvcache_reference(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512,
                                                    causal=case.causal)
        assert np.isfinite(out).all(), case.name
        # A query row sees no key where the sequence is empty, or (causal) shorter than s_q - i.
        seen = inp.cache_seqlens[:, None] - (case.s_q - 1 - np.arange(case.s_q) if case.causal else 0)
        assert (np.isinf(lse) == (seen <= 0)[:, None, :]).all(), case.name
        schedule(inp.cache_seqlens, 132)


def test_sanitizer_cases_list_without_a_gpu(sanitize_cases, capsys):
    assert sanitize_cases.main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [c.name for c in sanitize_cases.CASES]


def _fake_checkout(tmp_path, errors, driver_rc=0, sleep_tool=None):
    """A copy of scripts/sanitize.sh beside a stand-in driver, and a stand-in compute-sanitizer
    that runs the driver and reports `errors[tool]` errors."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "sanitize.sh", tmp_path / "scripts" / "sanitize.sh")
    (tmp_path / "scripts" / "sanitize_cases.py").write_text(textwrap.dedent(f"""\
        import sys
        print("[portable] page1: ok")
        print("sanitize_cases: 1 run, 0 skipped, {int(driver_rc != 0)} failed")
        sys.exit({driver_rc})
        """))
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        if [[ $1 == --version ]]; then echo "stand-in compute-sanitizer"; exit 0; fi
        tool=$2
        while [[ $1 == --* ]]; do shift 2; done
        "$@"; rc=$?
        [[ $tool == "{sleep_tool}" ]] && sleep 30
        case $tool in {" ".join(f"{t}) n={n};;" for t, n in errors.items())} esac
        echo "========= ERROR SUMMARY: $n errors"
        exit $rc
        """))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, SANITIZER=str(fake), MLA_CUPY_CACHE_DIR=str(tmp_path / "cache"),
               MLA_CUPY_OUT_DIR=str(tmp_path / "logs"), SANITIZE_TIMEOUT="5")
    return env


TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
@pytest.mark.parametrize("errors, driver_rc, sleep_tool, rc", [
    (dict.fromkeys(TOOLS, 0), 0, None, 0),
    (dict(dict.fromkeys(TOOLS, 0), racecheck=3), 0, None, 1),
    (dict.fromkeys(TOOLS, 0), 1, None, 1),
    (dict.fromkeys(TOOLS, 0), 0, "initcheck", 1),
])
def test_sanitize_script_summary_and_exit_status(tmp_path, errors, driver_rc, sleep_tool, rc):
    env = _fake_checkout(tmp_path, errors, driver_rc, sleep_tool)
    proc = subprocess.run(["bash", "scripts/sanitize.sh", "--kinds", "portable"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    summary = proc.stdout.split("===== summary")[1].splitlines()
    for tool in TOOLS:
        line = next(x for x in summary if x.startswith(f"{tool}: "))
        if tool == sleep_tool:
            assert "stopped after 5 s" in line
        else:
            assert line.startswith(f"{tool}: {errors[tool]} errors"), line
    assert (tmp_path / "logs" / "sanitize_memcheck.log").is_file()
    assert "--leak-check full" in proc.stdout


def test_long_run_flatness(long_run):
    mib = long_run.MIB

    def samples(rss, held, used):
        return [dict(calls=c, rss=r * mib, pool_held=h * mib, device_used=u * mib)
                for c, r, h, u in zip((20, 40, 200, 400), rss, held, used)]

    ok, text = long_run.flat(samples((500, 900, 910, 920), (1000, 3000, 3000, 3010), (4000, 6000, 6000, 6000)),
                             400, 64)
    assert ok, text  # growth during the first tenth does not count
    assert "from call 40 to call 400" in text
    ok, text = long_run.flat(samples((500, 600, 700, 800), (1000,) * 4, (4000,) * 4), 400, 64)
    assert not ok and "host RSS +200.0 MiB" in text
    ok, _ = long_run.flat(samples((500,) * 4, (1000, 1000, 1000, 1100), (4000,) * 4), 400, 64)
    assert not ok


@pytest.fixture(scope="module")
def edge_inputs():
    return _script("edge_inputs")


def test_edge_cases_are_the_ones_asked_for(edge_inputs):
    by_name = {c.name: c for c in edge_inputs.CASES}
    assert len(by_name) == len(edge_inputs.CASES)
    assert any(len(c.seqlens) == 0 for c in edge_inputs.CASES)
    assert any(c.h_q == 1 for c in edge_inputs.CASES)  # h_q = h_kv (MLA: one KV head)
    assert any(c.causal and c.seqlens and c.s_q > max(c.seqlens) for c in edge_inputs.CASES)
    assert any(c.strided for c in edge_inputs.CASES)
    assert any(c.zero_blocks and not any(c.seqlens) for c in edge_inputs.CASES)


@pytest.mark.parametrize("index", range(5))
def test_edge_inputs_are_what_they_say(edge_inputs, index):
    case = edge_inputs.CASES[index]
    q, k_cache, table, seqlens = edge_inputs.make_inputs(case)
    b = len(case.seqlens)
    assert q.shape == (b, case.s_q, case.h_q, 576) and q.dtype.name == "bfloat16"
    assert seqlens.tolist() == list(case.seqlens) and seqlens.dtype == np.int32 and table.dtype == np.int32
    assert table.shape[0] == b and k_cache.shape[1:] == (64, 1, 576)
    if case.strided:  # every other request of a batch twice as large: batch strides doubled
        assert q.strides[0] == 2 * q[0].nbytes and table.strides[0] == 2 * table.shape[1] * 4
    if case.zero_blocks:
        assert k_cache.shape[0] == 0
    # Every page a sequence reads is in the cache, its slots past the sequence NaN-free only
    # where tokens are; the reference runs on them.
    for r, n in enumerate(seqlens.tolist()):
        for j in range(-(-n // 64)):
            page = k_cache[table[r, j]].astype(np.float32)
            count = min(64, n - 64 * j)
            assert not np.isnan(page[:count]).any() and np.isnan(page[count:]).all()
    out, lse = edge_inputs.reference(case, (q, k_cache, table, seqlens))
    assert out.shape == (b, case.s_q, case.h_q, 512) and not np.isnan(out).any()


def test_edge_inputs_without_a_gpu_says_so():
    from mla_cupy.testing import gpu_status

    if gpu_status()[0]:
        pytest.skip("a GPU is present: scripts/edge_inputs.py would run the cases")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "edge_inputs.py")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert run.returncode == 2 and "edge_inputs: no NVIDIA driver or GPU found" in run.stdout, run.stdout + run.stderr
