"""Every script in examples/ runs, as a user would run it from a checkout.

gpu lane: each example exits 0 and its last line starts with "OK" (it checked its result
against the float64 reference). cpu lane, only where no GPU is visible: each example says so in
its first line and exits 0; the quickstart then runs the NumPy reference.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
# The framework an example needs besides mla_cupy, if any.
NEEDS = {"torch_example.py": "torch", "jax_example.py": "jax", "deepseek_v3_decode_jax.py": "jax"}


def run_example(name, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    report = f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc, report


@pytest.mark.cpu
def test_the_examples_are_there():
    expected = {"quickstart.py", "jax_example.py", "torch_example.py", "cuda_graph.py",
                "deepseek_v3_decode.py", "deepseek_v3_decode_jax.py"}
    assert expected <= set(EXAMPLES), f"missing examples: {sorted(expected - set(EXAMPLES))}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_on_gpu(name):
    framework = NEEDS.get(name)
    if framework and importlib.util.find_spec(framework) is None:
        pytest.skip(f"{name} needs {framework}, which is not installed")
    proc, report = run_example(name)
    assert proc.returncode == 0, report
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("OK"), report


@pytest.mark.cpu
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_without_gpu_says_so(name, gpu_available):
    if gpu_available:
        pytest.skip("a CUDA GPU is visible, so the examples' no-GPU path cannot run here")
    proc, report = run_example(name, timeout=300)
    assert proc.returncode == 0, report
    lines = proc.stdout.strip().splitlines()
    assert lines, report
    first = lines[0].lower()
    assert "no cuda gpu" in first or "is not installed" in first, report
    if name == "quickstart.py":
        assert len(lines) == 2 and lines[1].startswith("NumPy reference:"), report
        assert "all finite: True" in lines[1], report
