"""GPU lane: many threads and two devices at once.

* Eight threads, each on a CuPy stream of its own, make their first calls at the same moment in
  a fresh process with an empty kernel cache, then keep decoding: every module is compiled once
  (``_compile._compiles``), and every result matches the float64 reference.
* Two GPUs (skipped with fewer): arrays on device 1 while device 0 is current, ``warmup`` of
  device 1, and both devices decoding at once from two threads.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys
import threading
import traceback

import numpy as np
import pytest

import cupy

from mla_cupy import _select, flash_mla_with_kvcache, get_mla_metadata, warmup
from mla_cupy.reference import flash_mla_with_kvcache_reference
from mla_cupy.testing import assert_mla_close, make_decode_inputs

pytestmark = pytest.mark.gpu

ROOT = pathlib.Path(__file__).resolve().parent.parent
D, DV, PAGE, H_Q = 576, 512, 64, 16
THREADS = 8
ITERATIONS = 40


def thread_problem(i):
    """(dtype, s_q) of thread i: two dtypes and two query lengths, so four threads at once ask
    for each decode module and all eight for the scheduler's."""
    return ("bfloat16", "float16")[i % 2], 1 + (i // 4) % 2


def thread_inputs(i, seed):
    """Two input sets of thread i (different batch sizes and lengths) with their references."""
    dtype, s_q = thread_problem(i)
    sets = []
    for j, seqlens in enumerate(([1, 300, 1500], [0, 64, 65, 700, 2000])):
        inp = make_decode_inputs(len(seqlens), s_q, H_Q, 1, head_dim=D, head_dim_v=DV, page_block_size=PAGE,
                                 seqlens=seqlens, dtype=dtype, seed=seed + 10 * i + j)
        ref = flash_mla_with_kvcache_reference(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, DV,
                                               causal=True)
        sets.append((inp, ref))
    return sets


def decode_loop(sets, iterations, label, errors, barrier):
    """Copy `sets` to the current device, wait at `barrier`, then decode them in turn on the
    current stream, `iterations` times, checking each result against its reference. A failure
    goes to `errors` (and breaks the barrier, so that no thread waits for this one forever)."""
    try:
        stream = cupy.cuda.get_current_stream()
        dev = [tuple(cupy.asarray(x) for x in (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens))
               for inp, _ in sets]
        buffers = [(cupy.empty((*inp.q.shape[:3], DV), dtype=inp.q.dtype),
                    cupy.empty((inp.q.shape[0], H_Q, inp.q.shape[1]), dtype=cupy.float32)) for inp, _ in sets]
        stream.synchronize()
        barrier.wait()
        for it in range(iterations):
            k = it % len(sets)
            (inp, (out_ref, lse_ref)), (q, kc, bt, sl) = sets[k], dev[k]
            meta = get_mla_metadata(sl, inp.q.shape[1] * H_Q, 1)
            extra = dict(zip(("out", "lse"), buffers[k])) if it % 3 == 2 else {}
            out, lse = flash_mla_with_kvcache(q, kc, bt, sl, DV, *meta, causal=True, **extra)
            assert not extra or out.data.ptr == buffers[k][0].data.ptr
            assert_mla_close(out.get(), lse.get(), out_ref, lse_ref, std=inp.std,
                             msg=f"{label}, iteration {it}, input set {k}, seed {inp.seed}")
    except Exception:  # noqa: BLE001 - reported by the test
        errors.append(f"{label}: {traceback.format_exc()}")
        barrier.abort()


def run_threads(bodies):
    """Run each of `bodies` (a function of a barrier, see decode_loop) on a thread of its own;
    the threads wait for each other at the barrier before their first call."""
    barrier = threading.Barrier(len(bodies))
    threads = [threading.Thread(target=body, args=(barrier,)) for body in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---- eight threads, cold cache ------------------------------------------------------------------

def child(seed):
    """In a fresh process (cache dir from the environment): eight threads, each on a stream of
    its own, first calls at once; prints what was compiled and what went wrong, as JSON."""
    from mla_cupy import _compile

    errors = []
    inputs = [thread_inputs(i, seed) for i in range(THREADS)]

    def body(i, barrier):
        with cupy.cuda.Stream(non_blocking=True):
            decode_loop(inputs[i], ITERATIONS, f"thread {i} {thread_problem(i)}", errors, barrier)

    run_threads([functools.partial(body, i) for i in range(THREADS)])
    cupy.cuda.Device().synchronize()
    print(json.dumps(dict(compiles=dict(_compile._compiles), errors=errors,
                          files=sorted(os.listdir(_compile.cache_dir())))))


def test_eight_threads_compile_each_module_once_and_decode_correctly(tmp_path):
    for i in range(THREADS):  # a kernel family forced by MLA_CUPY_KERNEL that cannot run these: skip
        dtype, s_q = thread_problem(i)
        _select.decode_choice(cupy.cuda.runtime.getDevice(), dtype, D, DV, s_q * H_Q, PAGE)
    env = dict(os.environ, MLA_CUPY_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("MLA_CUPY_NO_COMPILE", None)
    env.pop("MLA_CUPY_DUMP_SOURCE", None)
    seed = int(np.random.SeedSequence().entropy % (1 << 30))
    proc = subprocess.run([sys.executable, __file__, "child", str(seed)], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"child failed (seed {seed}):\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["errors"], f"seed {seed}:\n" + "\n".join(report["errors"])
    compiles = report["compiles"]
    assert "metadata" in compiles and any(name.startswith("combine_") for name in compiles), compiles
    assert len(compiles) >= 4, compiles  # scheduler, a combine and a decode per dtype at least
    assert all(n == 1 for n in compiles.values()), f"modules compiled more than once: {compiles}"
    entries = [f for f in report["files"] if f.endswith(".bin")]
    assert len(entries) == len(compiles) and len(report["files"]) == len(entries), report["files"]


# ---- two devices ----------------------------------------------------------------------------------

def _device_count():
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        return 0


@pytest.fixture
def two_devices():
    if _device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    for device in (0, 1):
        cc = int(cupy.cuda.Device(device).compute_capability)
        if cc < 80:
            pytest.skip(f"device {device} has compute capability {cc // 10}.{cc % 10} (needs 8.0)")


def test_arrays_on_device_1_while_device_0_is_current(two_devices):
    (inp, (out_ref, lse_ref)), _ = thread_inputs(0, int(np.random.SeedSequence().entropy % (1 << 30)))
    with cupy.cuda.Device(1):
        q, kc, bt, sl = (cupy.asarray(x) for x in (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens))
        cupy.cuda.Device().synchronize()
    with cupy.cuda.Device(0):
        seconds = warmup(head_dims=[(D, DV)], dtypes=[inp.q.dtype.name], num_q_tokens_per_head_k=H_Q, device=1)
        assert seconds and cupy.cuda.runtime.getDevice() == 0
        for _ in range(3):  # first call, then the same signature again
            meta = get_mla_metadata(sl, H_Q, 1)
            out, lse = flash_mla_with_kvcache(q, kc, bt, sl, DV, *meta, causal=True)
            assert cupy.cuda.runtime.getDevice() == 0, "a call changed the current device"
            assert meta[0].device.id == 1 and out.device.id == 1 and lse.device.id == 1
            with cupy.cuda.Device(1):
                assert_mla_close(out.get(), lse.get(), out_ref, lse_ref, std=inp.std, msg="device 1 from device 0")


def test_both_devices_decode_at_once(two_devices):
    errors = []
    seed = int(np.random.SeedSequence().entropy % (1 << 30))
    inputs = [thread_inputs(i, seed) for i in range(2)]

    def body(device, barrier):
        with cupy.cuda.Device(device), cupy.cuda.Stream(non_blocking=True):
            decode_loop(inputs[device], ITERATIONS, f"device {device}", errors, barrier)

    run_threads([functools.partial(body, 0), functools.partial(body, 1)])
    assert not errors, "\n".join(errors)


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child(int(sys.argv[2]))
