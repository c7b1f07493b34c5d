"""``python -m mla_cupy.selftest``.

cpu lane: without a usable GPU it exits with status 2 and one line saying why (no traceback);
its cases cover what it promises and every kernel family runs them; its verdict lines, summary
and exit status follow the checks' outcomes (the GPU parts replaced by stand-ins).
gpu lane: the real run exits 0 with one PASS line per kernel family's load and per case.
"""

import dataclasses
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

from mla_cupy import _launch, _select, selftest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_python(args, timeout=300, **env_overrides):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(env_overrides)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def verdicts(stdout):
    """``[(verdict, family, what)]`` of the verdict lines of a run's output."""
    found = []
    for line in stdout.splitlines():
        match = re.match(r"(PASS|FAIL|SKIP) (\S+)\s+(.+?): ", line)
        if match:
            found.append(match.groups())
    return found


# ---------------------------------------------------------------------------------------------
# cpu lane


@pytest.mark.cpu
def test_without_cupy_it_exits_2_with_one_line():
    code = ("import sys; sys.modules['cupy'] = None; "  # as if CuPy were not installed
            "from mla_cupy.selftest import main; sys.exit(main([]))")
    proc = run_python(["-c", code])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("python -m mla_cupy.selftest: no usable GPU: ")
    assert "need CuPy, which is not installed" in lines[0] and 'pip install ".[cuda12]"' in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.cpu
def test_without_a_gpu_it_exits_2_with_the_reason(gpu_available):
    if gpu_available:
        pytest.skip("a CUDA GPU is visible, so the no-GPU path cannot run here")
    from mla_cupy.testing import gpu_status

    proc = run_python(["-m", "mla_cupy.selftest"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"python -m mla_cupy.selftest: no usable GPU: {gpu_status()[1]}"]


@pytest.mark.cpu
def test_bad_arguments_are_refused():
    for argv in (["--kernels", "fast"], ["--kernels", ""], ["--kernels", "auto"], ["--iters", "0"],
                 ["--seed", "-1"]):
        with pytest.raises(SystemExit) as info:
            selftest.parse_args(argv)
        assert info.value.code == 2, argv
    args = selftest.parse_args(["--kernels", "sm90, portable,sm90", "--iters", "3", "--seed", "7"])
    assert args.kernels == ("sm90", "portable") and args.iters == 3 and args.seed == 7
    assert selftest.parse_args([]).kernels is None
    assert set(selftest.FAMILY_NAMES) == {f.NAME for f in _select.FAMILIES}


@pytest.mark.cpu
def test_import_pulls_neither_cupy_nor_torch():
    code = ("import sys, mla_cupy.selftest; "
            "bad = [m for m in ('cupy', 'torch', 'jax') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    proc = run_python(["-c", code])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.cpu
def test_cases_cover_what_the_selftest_promises():
    cases = selftest.CASES
    assert {c.dtype for c in cases} == {"bfloat16", "float16"}
    assert {c.s_q for c in cases} == {1, 2}
    assert {c.h_q for c in cases} == {16, 128}
    assert {c.page_block_size for c in cases} == {64}
    assert any(c.seqlens is None for c in cases), "a batch of drawn (variable) lengths"
    fixed = [n for c in cases if c.seqlens is not None for n in c.seqlens]
    assert len({n for n in fixed}) > 4, "a batch of fixed, different lengths"
    assert any(n % 64 for n in fixed), "a length whose last page has a NaN-poisoned tail"
    assert 0 in fixed and 1 in fixed, "an empty request and one whose first query row sees no key"
    assert {c.causal for c in cases} == {True, False}
    assert max(c.batch for c in cases) > 132, "more requests than an H200 has SMs"
    names = [c.name for c in cases]
    assert len(set(names)) == len(names)
    for c in cases:
        assert ":" not in c.name  # the verdict line's separator


@pytest.mark.cpu
def test_cases_build_their_inputs():
    for i, case in enumerate(selftest.CASES):
        inp = case.inputs(seed=i)
        assert inp.q.shape == (case.batch, case.s_q, case.h_q, case.head_dim)
        assert inp.q.dtype.name == case.dtype and inp.page_block_size == case.page_block_size
        if case.seqlens is not None:
            assert tuple(inp.cache_seqlens) == case.seqlens
        assert (inp.k_cache != inp.k_cache).any(), "unused KV slots are NaN"
        assert case.inputs(seed=i).q.tobytes() == inp.q.tobytes(), "the seed fixes the inputs"


H200 = _launch.DeviceInfo(90, 132, 232448, 233472)
A100 = _launch.DeviceInfo(80, 108, 166912, 167936)
L40 = _launch.DeviceInfo(89, 142, 101376, 102400)


@pytest.mark.cpu
@pytest.mark.parametrize("device", [H200, A100, L40], ids=["sm90", "sm80", "sm89"])
def test_every_family_a_gpu_runs_runs_every_case(device):
    """No case is skipped on a GPU: a family that runs the DeepSeek problem runs all of them."""
    p = selftest.DEEPSEEK_PROBLEM
    deepseek = _select.Problem(p["dtype"], p["head_dim"], p["head_dim_v"], p["m"], p["page_block_size"])
    runnable = [f for f in _select.FAMILIES if f.supports(device, deepseek) is not None]
    assert [f.NAME for f in runnable] == (["sm90", "portable"] if device.cc == 90 else ["portable"])
    for family in runnable:
        for case in selftest.CASES:
            problem = _select.Problem(case.dtype, case.head_dim, case.head_dim_v, case.rows, case.page_block_size)
            assert family.supports(device, problem) is not None, (family.NAME, case.name)


@pytest.mark.cpu
@pytest.mark.parametrize("text,release", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Thu Oct 30 2025\nGCC version: gcc 12\n",
     "580.159.04"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (builder)  2025\n",
     "570.86.15"),
    ("NVRM version: NVIDIA UNIX aarch64 Kernel Module  550.54  Thu Feb 22 2024", "550.54"),
    ("something else", None),
])
def test_driver_release_is_read_from_the_kernel_module_line(text, release):
    assert selftest.parse_driver_release(text) == release


class _Family(types.SimpleNamespace):
    pass


@pytest.fixture
def stand_ins(monkeypatch):
    """selftest.run with its GPU parts replaced: two families, each case passing unless listed
    in ``state["fail"]`` ((family, case index)), a family's load failing if in ``state["load"]``."""
    state = {"fail": set(), "load": set(), "unsupported": {}, "raise": set(), "cases": {}}
    families = [_Family(NAME="sm90"), _Family(NAME="portable")]
    monkeypatch.setattr(selftest, "_current_device", lambda: 0)
    monkeypatch.setattr(selftest, "header_lines", lambda device_id: ["header line"])
    monkeypatch.setattr(selftest, "family_support",
                        lambda device_id: [(f, state["unsupported"].get(f.NAME, "")) for f in families])
    monkeypatch.setattr(selftest, "case_support",
                        lambda family, device_id, case: state["cases"].get((family.NAME, case), ""))

    @dataclasses.dataclass
    class Prepared:
        case: object
        seed: int

        @property
        def host(self):
            return types.SimpleNamespace(seed=self.seed)

    monkeypatch.setattr(selftest, "_Prepared", Prepared)

    def load_family(name, device_id, cases):
        if name in state["load"]:
            raise RuntimeError("NVRTC said no\nline 1 of the log")
        return 0.5, {"a": 0.25, "b": 0.25}

    def check_case(name, device_id, prepared, iters):
        index = selftest.CASES.index(prepared.case)
        if (name, index) in state["raise"]:
            raise ValueError("something broke\nsecond line")
        ok = (name, index) not in state["fail"]
        return ok, "details", [] if ok else ["    more"]

    monkeypatch.setattr(selftest, "load_family", load_family)
    monkeypatch.setattr(selftest, "check_case", check_case)
    return state


def _run(argv=()):
    lines = []
    status = selftest.run(selftest.parse_args(list(argv)), emit=lines.append)
    return status, lines


@pytest.mark.cpu
def test_run_all_passing(stand_ins):
    status, lines = _run()
    assert status == 0
    found = verdicts("\n".join(lines))
    n = len(selftest.CASES)
    assert found == [("PASS", family, what) for family in ("sm90", "portable")
                     for what in ["load"] + [c.name for c in selftest.CASES]]
    assert lines[0] == "header line"
    assert re.match(rf"selftest: all {2 * (n + 1)} checks passed \(", lines[-1]), lines[-1]
    assert "1.0 s compiling or loading kernels" in lines[-1]


@pytest.mark.cpu
def test_run_reports_a_failed_case_and_exits_1(stand_ins):
    stand_ins["fail"].add(("portable", 1))
    stand_ins["raise"].add(("sm90", 0))
    status, lines = _run()
    assert status == 1
    found = verdicts("\n".join(lines))
    assert [v for v in found if v[0] != "PASS"] == [
        ("FAIL", "sm90", selftest.CASES[0].name), ("FAIL", "portable", selftest.CASES[1].name)]
    text = "\n".join(lines)
    assert f"FAIL sm90      {selftest.CASES[0].name}: ValueError: something broke\n    inputs: seed 0\n" in text
    assert "    more" in lines
    assert re.match(rf"selftest: 2 of {2 * (len(selftest.CASES) + 1)} checks FAILED \(", lines[-1])


@pytest.mark.cpu
def test_run_reports_a_load_failure_and_its_cases(stand_ins):
    stand_ins["load"].add("sm90")
    status, lines = _run()
    assert status == 1
    found = verdicts("\n".join(lines))
    sm90 = [v for v in found if v[1] == "sm90"]
    assert sm90 == [("FAIL", "sm90", "load")] + [("FAIL", "sm90", c.name) for c in selftest.CASES]
    assert all(v[0] == "PASS" for v in found if v[1] == "portable")
    assert "FAIL sm90      load: RuntimeError: NVRTC said no" in lines
    assert "    line 1 of the log" in lines


@pytest.mark.cpu
def test_run_checks_only_the_families_the_gpu_runs(stand_ins):
    stand_ins["unsupported"]["sm90"] = "needs compute capability 9.0"
    status, lines = _run()
    assert status == 0
    assert {v[1] for v in verdicts("\n".join(lines))} == {"portable"}
    assert "kernel family sm90: not run by this GPU (needs compute capability 9.0)" in lines
    # Asked for by name, a family the GPU cannot run is a failure.
    status, lines = _run(["--kernels", "sm90"])
    assert status == 1
    assert verdicts("\n".join(lines)) == [("FAIL", "sm90", "load")]


@pytest.mark.cpu
def test_run_skips_a_case_a_family_does_not_cover(stand_ins):
    stand_ins["cases"][("sm90", selftest.CASES[2])] = "page size"
    status, lines = _run(["--kernels", "sm90"])
    assert status == 0
    assert ("SKIP", "sm90", selftest.CASES[2].name) in verdicts("\n".join(lines))
    assert ", 1 skipped" in lines[-1]


# ---------------------------------------------------------------------------------------------
# gpu lane


@pytest.mark.gpu
def test_selftest_passes_on_this_gpu():
    proc = run_python(["-m", "mla_cupy.selftest"], timeout=900)
    report = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    lines = proc.stdout.splitlines()
    checked = re.search(r"^checking kernel families: ([^;]+);", proc.stdout, re.M)
    assert checked, report
    families = checked.group(1).split(", ")
    from mla_cupy.testing import gpu_status

    if "compute capability 9.0" in gpu_status()[1]:
        assert families == ["sm90", "portable"], report
    else:
        assert families == ["portable"], report
    expected = [("PASS", family, what) for family in families
                for what in ["load"] + [c.name for c in selftest.CASES]]
    assert verdicts(proc.stdout) == expected, report
    for key in ("mla_cupy selftest: mla_cupy", "CuPy", "compute capability", "NVIDIA driver",
                "kernel family selected:", "kernel cache:"):
        assert key in proc.stdout, (key, report)
    summary = re.fullmatch(r"selftest: all (\d+) checks passed \(([\d.]+) s in all: ([\d.]+) s compiling or "
                           r"loading kernels, [\d.]+ s making inputs and the float64 reference\)", lines[-1])
    assert summary and int(summary.group(1)) == len(expected), report
