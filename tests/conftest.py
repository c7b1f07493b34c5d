"""Test lanes and GPU detection.

Every test carries at least one lane marker (registered in pyproject.toml):

* ``cpu``: runs anywhere (NumPy reference, scheduler, validation, interop dispatch);
* ``compile``: NVRTC builds kernels for sm_80 and sm_90a; needs NVRTC, not a GPU;
* ``gpu``: needs a CUDA GPU that mla_cupy supports; skipped with the reason where there is none.

A collected test without a lane marker is a usage error, so no test can slip out of every lane.
``--require-gpu`` turns the gpu lane's skip into a failure (for runs on a GPU machine, where a
skip would mean a broken setup rather than a missing device).

Importing this file imports neither torch nor jax (nor CuPy until a gpu-marked test runs).
"""

import functools
import os

import pytest

LANES = ("cpu", "compile", "gpu")


def pytest_addoption(parser):
    parser.addoption(
        "--require-gpu", action="store_true", default=False,
        help="fail the gpu-marked tests instead of skipping them when no usable CUDA GPU is found",
    )


@functools.lru_cache(maxsize=None)
def gpu_status():
    """``(True, description)`` if CuPy sees a GPU mla_cupy supports, else ``(False, reason)``
    (``mla_cupy.testing.gpu_status``, asked once per session)."""
    from mla_cupy.testing import gpu_status as probe

    return probe()


def gpu_available():
    """True if CuPy sees a CUDA GPU that mla_cupy supports."""
    return gpu_status()[0]


@pytest.fixture(name="gpu_available", scope="session")
def gpu_available_fixture():
    """Whether a supported CUDA GPU is visible (for tests that behave differently without one)."""
    return gpu_available()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Runs before ``-m`` deselects anything, so an unmarked test is caught whatever lane is run.
    unmarked = [item.nodeid for item in items
                if not any(item.get_closest_marker(lane) for lane in LANES)]
    if unmarked:
        listed = "\n  ".join(unmarked)
        raise pytest.UsageError(
            f"every test needs a lane marker ({', '.join(LANES)}); these have none "
            f"(add e.g. `pytestmark = pytest.mark.cpu` to the module):\n  {listed}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Only selected gpu tests probe the device, so `pytest -m cpu` never imports CuPy here.
    if item.get_closest_marker("gpu") is None:
        return
    ok, reason = gpu_status()
    if ok:
        return
    if item.config.getoption("--require-gpu"):
        pytest.fail(f"--require-gpu: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # With MLA_CUPY_KERNEL forcing one kernel family (the gpu lane runs once per family), a
    # problem that family does not cover is refused with UnsupportedDeviceError naming the
    # kind: report that test as skipped, with the refusal as the reason, not as a failure.
    outcome = yield
    report = outcome.get_result()
    kind = os.environ.get("MLA_CUPY_KERNEL", "").strip().lower()
    if call.when != "call" or call.excinfo is None or not report.failed or kind in ("", "auto"):
        return
    exc = call.excinfo.value
    if type(exc).__name__ == "UnsupportedDeviceError" and f"of kind {kind!r}" in str(exc):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"MLA_CUPY_KERNEL={kind}: {exc}")


@pytest.fixture
def jax_gpu():
    """(jax, its first GPU device); skips without JAX or without JAX's GPU backend."""
    jax = pytest.importorskip("jax", reason="JAX is not installed")
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        devices = []
    if not devices:
        pytest.skip("JAX has no GPU backend")
    return jax, devices[0]
