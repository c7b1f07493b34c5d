"""``mla_cupy.torch_ops`` without a GPU.

Always: importing mla_cupy (and its other modules) never imports torch, and importing
``mla_cupy.torch_ops`` without a usable torch says what it needs. Where torch is installed
(the tests skip otherwise): the ops are registered with FlashMLA's arguments, their fake
implementations give the results' shapes and dtypes (fake CUDA tensors, no GPU), and
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` go through them, with CPU
stand-ins for the two GPU calls.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.cpu

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_python(code, pythonpath=()):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*map(str, pythonpath), str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_importing_mla_cupy_never_imports_torch(tmp_path):
    # A torch that fails loudly when imported, ahead of any real one on the path: the import
    # must not happen even where torch is installed.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise RuntimeError('torch was imported')\n")
    code = ("import sys, io\n"
            "import mla_cupy, mla_cupy.reference, mla_cupy.testing, mla_cupy.scheduler, mla_cupy.selftest\n"
            "import mla_cupy.bench, mla_cupy.interface, mla_cupy._interop, mla_cupy._select\n"
            "mla_cupy.show_config(file=io.StringIO())\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    proc = run_python(code, pythonpath=[tmp_path])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_without_torch_the_module_says_what_it_needs():
    proc = run_python("import sys; sys.modules['torch'] = None\nimport mla_cupy.torch_ops")
    assert proc.returncode == 1
    assert "ImportError: mla_cupy.torch_ops needs PyTorch 2.4 or newer, which cannot be imported" in proc.stderr
    assert "the rest of mla_cupy works without it" in proc.stderr


def test_an_old_torch_is_refused():
    code = ("import sys, types\n"
            "torch = types.ModuleType('torch'); torch.__version__ = '2.3.1'; torch.library = types.SimpleNamespace()\n"
            "sys.modules['torch'] = torch\n"
            "import mla_cupy.torch_ops\n")
    proc = run_python(code)
    assert proc.returncode == 1
    assert ("ImportError: mla_cupy.torch_ops needs PyTorch 2.4 or newer (torch.library.custom_op); this is "
            "PyTorch 2.3.1") in proc.stderr


# ---------------------------------------------------------------------------------------------
# With torch installed.


@pytest.fixture
def torch_ops():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not hasattr(torch.library, "custom_op"):
        pytest.skip(f"PyTorch {torch.__version__} has no torch.library.custom_op (2.4 or newer)")
    import mla_cupy.torch_ops

    return mla_cupy.torch_ops


SM_PARTS = 7


@pytest.fixture
def stand_ins(torch_ops, monkeypatch):
    """CPU stand-ins for the GPU: the schedule from the host scheduler, the decode from the
    float64 reference, written into the op's out / lse. Returns the list of calls made."""
    import torch

    from mla_cupy import interface, scheduler
    from mla_cupy.reference import flash_mla_with_kvcache_reference

    calls = []
    monkeypatch.setattr(torch_ops, "_num_sm_parts", lambda device, m, h_kv: calls.append(("parts", m, h_kv))
                        or SM_PARTS)

    def get_mla_metadata(cache_seqlens, m, h_kv, h_q=None, is_fp8_kvcache=False, topk=None):
        calls.append(("metadata", m, h_kv, h_q))
        sched, splits = scheduler.schedule(cache_seqlens.numpy(), SM_PARTS)
        return torch.from_numpy(sched), torch.from_numpy(splits)

    def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, sched, splits,
                               softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None, *,
                               out=None, lse=None):
        calls.append(("decode", head_dim_v, softmax_scale, causal, out is not None, lse is not None))
        o, s = flash_mla_with_kvcache_reference(q.float().numpy(), k_cache.float().numpy(), block_table.numpy(),
                                                cache_seqlens.numpy(), head_dim_v, softmax_scale=softmax_scale,
                                                causal=causal)
        out.copy_(torch.from_numpy(o))
        lse.copy_(torch.from_numpy(s))
        return out, lse

    monkeypatch.setattr(interface, "get_mla_metadata", get_mla_metadata)
    monkeypatch.setattr(interface, "flash_mla_with_kvcache", flash_mla_with_kvcache)
    return calls


def cpu_inputs(dtype="float16", s_q=2, h_q=16, seqlens=(5, 40, 77), page=16, seed=1):
    import torch

    from mla_cupy.testing import make_decode_inputs

    inp = make_decode_inputs(len(seqlens), s_q, h_q, page_block_size=page, seqlens=list(seqlens), dtype=dtype,
                             seed=seed)
    as_torch = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    q = torch.from_numpy(inp.q.view(np.int16)).view(as_torch)
    k_cache = torch.from_numpy(inp.k_cache.view(np.int16)).view(as_torch)
    return inp, (q, k_cache, torch.from_numpy(inp.block_table), torch.from_numpy(inp.cache_seqlens))


def test_ops_are_registered_with_flashmla_arguments(torch_ops):
    import torch

    assert torch_ops.NAMESPACE == "mla_cupy"
    schema = str(torch.ops.mla_cupy.flash_mla_with_kvcache.default._schema)
    names = ["q", "k_cache", "block_table", "cache_seqlens", "head_dim_v", "tile_scheduler_metadata",
             "num_splits", "softmax_scale=None", "causal=False", "is_fp8_kvcache=False", "indices=None"]
    assert [part.split()[-1] for part in schema.split("(", 1)[1].split(") ->")[0].split(", ")] == names
    assert schema.endswith("-> (Tensor, Tensor)")
    schema = str(torch.ops.mla_cupy.get_mla_metadata.default._schema)
    names = ["cache_seqlens", "num_q_tokens_per_head_k", "num_heads_k", "num_heads_q=None",
             "is_fp8_kvcache=False", "topk=None"]
    assert [part.split()[-1] for part in schema.split("(", 1)[1].split(") ->")[0].split(", ")] == names
    assert schema.endswith("-> (Tensor, Tensor)")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("s_q,h_q,dims", [(1, 128, (576, 512)), (2, 16, (576, 512)), (3, 32, (320, 256))])
def test_fake_implementations_give_shapes_and_dtypes(torch_ops, stand_ins, dtype, s_q, h_q, dims):
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    as_torch = getattr(torch, dtype)
    b, d, dv = 5, *dims
    with FakeTensorMode():
        q = torch.empty(b, s_q, h_q, d, dtype=as_torch, device="cuda")
        k_cache = torch.empty(40, 64, 1, d, dtype=as_torch, device="cuda")
        block_table = torch.empty(b, 8, dtype=torch.int32, device="cuda")
        seqlens = torch.empty(b, dtype=torch.int32, device="cuda")
        sched, splits = torch.ops.mla_cupy.get_mla_metadata(seqlens, s_q * h_q, 1)
        out, lse = torch.ops.mla_cupy.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, dv, sched, splits,
                                                             causal=True)
    assert (sched.shape, sched.dtype, sched.device.type) == ((SM_PARTS, 8), torch.int32, "cuda")
    assert (splits.shape, splits.dtype) == ((b + 1,), torch.int32)
    assert (out.shape, out.dtype, out.device.type) == ((b, s_q, h_q, dv), as_torch, "cuda")
    assert (lse.shape, lse.dtype) == ((b, h_q, s_q), torch.float32)
    assert out.is_contiguous() and lse.is_contiguous()
    assert stand_ins == [("parts", s_q * h_q, 1)], "nothing but the SM-part count is asked of the library"


def test_fake_implementations_refuse_what_has_no_shape(torch_ops, stand_ins):
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 1, 16, 576, dtype=torch.bfloat16, device="cuda")
        q3 = torch.empty(2, 16, 576, dtype=torch.bfloat16, device="cuda")
        seqlens = torch.empty(2, dtype=torch.int32, device="cuda")
        sched, splits = torch.ops.mla_cupy.get_mla_metadata(seqlens, 16, 1)
        with pytest.raises(ValueError, match=r"q: expected 4 dimensions"):
            torch.ops.mla_cupy.flash_mla_with_kvcache(q3, q, seqlens, seqlens, 512, sched, splits)
        with pytest.raises(ValueError, match=r"head_dim_v: expected a positive int, got 0"):
            torch.ops.mla_cupy.flash_mla_with_kvcache(q, q, seqlens, seqlens, 0, sched, splits)
        with pytest.raises(ValueError, match=r"cache_seqlens: expected 1 dimension"):
            torch.ops.mla_cupy.get_mla_metadata(q, 16, 1)
        with pytest.raises(ValueError, match=r"num_heads_k: expected a positive int, got 0"):
            torch.ops.mla_cupy.get_mla_metadata(seqlens, 16, 0)


def test_eager_calls_reach_the_library_with_torch_made_outputs(torch_ops, stand_ins):
    import torch

    from mla_cupy.reference import flash_mla_with_kvcache_reference
    from mla_cupy.testing import assert_mla_close

    inp, (q, k_cache, block_table, seqlens) = cpu_inputs()
    sched, splits = torch_ops.get_mla_metadata(seqlens, 32, 1, 16)
    out, lse = torch_ops.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched, splits, 0.07, True)
    assert stand_ins == [("metadata", 32, 1, 16), ("decode", 512, 0.07, True, True, True)]
    assert out.dtype == torch.float16 and out.shape == (3, 2, 16, 512) and lse.shape == (3, 16, 2)
    ref = flash_mla_with_kvcache_reference(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, 512,
                                           softmax_scale=0.07, causal=True)
    assert_mla_close(out.float().numpy(), lse.numpy(), *ref)


def test_compile_fullgraph_traces_each_call_as_one_node(torch_ops, stand_ins):
    import torch

    torch._dynamo.reset()
    _, (q, k_cache, block_table, seqlens) = cpu_inputs()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(q, k_cache, block_table, seqlens):
        sched, splits = torch.ops.mla_cupy.get_mla_metadata(seqlens, 32, 1)
        outs = []
        for layer in range(3):
            out, lse = torch_ops.flash_mla_with_kvcache(q * (layer + 1), k_cache, block_table, seqlens, 512, sched,
                                                        splits, causal=True)
            outs.append(out.float().sum() + lse.sum())
        return torch.stack(outs), sched, splits

    eager = step(q, k_cache, block_table, seqlens)
    for compiled in (torch.compile(step, fullgraph=True, backend=backend),
                     torch.compile(step, fullgraph=True, backend="aot_eager")):
        got = compiled(q, k_cache, block_table, seqlens)
        for a, b in zip(eager, got):
            assert torch.equal(a, b)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("mla_cupy.get_mla_metadata" in t for t in targets) == 1
    assert sum("mla_cupy.flash_mla_with_kvcache" in t for t in targets) == 3
    torch._dynamo.reset()


def test_opcheck_with_stand_ins(torch_ops, stand_ins):
    import torch

    _, (q, k_cache, block_table, seqlens) = cpu_inputs(dtype="bfloat16", s_q=1, h_q=64, seqlens=(0, 33, 200))
    results = torch.library.opcheck(torch_ops.get_mla_metadata, (seqlens, 64, 1))
    assert set(results.values()) == {"SUCCESS"}, results
    sched, splits = torch_ops.get_mla_metadata(seqlens, 64, 1)
    results = torch.library.opcheck(torch_ops.flash_mla_with_kvcache, (q, k_cache, block_table, seqlens, 512,
                                                                        sched, splits), {"causal": True})
    assert set(results.values()) == {"SUCCESS"}, results


def test_host_tensors_are_refused_by_the_library_naming_the_argument(torch_ops):
    from mla_cupy import UnsupportedDeviceError

    _, (q, k_cache, block_table, seqlens) = cpu_inputs()
    # Without CuPy the library says it needs it; with CuPy it names the host tensor.
    with pytest.raises((TypeError, UnsupportedDeviceError), match=r"cache_seqlens: .* in CPU memory|need CuPy"):
        torch_ops.get_mla_metadata(seqlens, 32, 1)
    for bad_q, head_dim_v in ((q, 512), (q[0], 512), (q, -5)):
        with pytest.raises((TypeError, UnsupportedDeviceError), match=r"q: .* in CPU memory|need CuPy"):
            torch_ops.flash_mla_with_kvcache(bad_q, k_cache, block_table, seqlens, head_dim_v, seqlens, seqlens)
