"""``mla_cupy.torch_ops`` on a GPU: the ops against the library and the float64 reference,
``torch.library.opcheck``, ``torch.compile(fullgraph=True)`` (default and "reduce-overhead")
against eager calls, and a ``torch.cuda.CUDAGraph`` capture and replay of a decode step of
several layers against eager steps, before and after its inputs are updated in place.

Skipped, with the reason, where there is no usable GPU (conftest.py), no PyTorch, no CUDA in
PyTorch, or a PyTorch older than 2.4. Inputs are fresh on every run; each failure message
carries the seed (``MLA_CUPY_TEST_SEED`` reruns the same inputs).
"""

import os
import zlib

import numpy as np
import pytest

from mla_cupy.reference import flash_mla_with_kvcache_reference
from mla_cupy.testing import assert_mla_close, make_decode_inputs

pytestmark = pytest.mark.gpu

BASE_SEED = int(os.environ.get("MLA_CUPY_TEST_SEED", np.random.SeedSequence().entropy % (1 << 31)))


def case_seed(*tags):
    return (BASE_SEED + zlib.crc32(repr(tags).encode())) % (1 << 31)


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA device")
    if not hasattr(torch.library, "custom_op"):
        pytest.skip(f"PyTorch {torch.__version__} has no torch.library.custom_op (2.4 or newer)")
    return torch


@pytest.fixture(scope="module")
def ops(torch):
    import mla_cupy.torch_ops

    return mla_cupy.torch_ops


def to_cuda(torch, x):
    """A host array (bfloat16 from ml_dtypes, float16, int32) as a CUDA tensor, bit for bit."""
    x = np.ascontiguousarray(x)
    if x.dtype.name in ("bfloat16", "float16"):
        return torch.from_numpy(x.view(np.int16)).cuda().view(getattr(torch, x.dtype.name))
    return torch.from_numpy(x).cuda()


class Step:
    """A decode step of `layers` layers on shared block table and seqlens: layer 0 uses the
    generated (NaN-poisoned) cache and queries, the others random ones of the same shapes."""

    def __init__(self, torch, ops, layers, batch, s_q, h_q, dtype, seed, mean_seqlen=1500):
        self.torch, self.ops = torch, ops
        self.host = make_decode_inputs(batch, s_q, h_q, page_block_size=64, mean_seqlen=mean_seqlen, varlen=True,
                                       dtype=dtype, seed=seed)
        h = self.host
        self.rows = s_q * h_q
        self.block_table, self.seqlens = to_cuda(torch, h.block_table), to_cuda(torch, h.cache_seqlens)
        self.qs, self.k_caches = [to_cuda(torch, h.q)], [to_cuda(torch, h.k_cache)]
        gen = torch.Generator(device="cuda").manual_seed(seed)
        for _ in range(layers - 1):
            self.qs.append(self.random_like(self.qs[0], gen))
            self.k_caches.append(self.random_like(self.k_caches[0], gen))
        self.context = (f"seed={h.seed} (rerun with MLA_CUPY_TEST_SEED={BASE_SEED}) b={batch} s_q={s_q} h_q={h_q} "
                        f"dtype={dtype} layers={layers} seqlens={h.cache_seqlens.tolist()}")

    def random_like(self, x, gen):
        return (0.1 * self.torch.randn(x.shape, device=x.device, generator=gen)).to(x.dtype)

    def args(self):
        return self.qs, self.k_caches, self.block_table, self.seqlens

    def __call__(self, qs=None, k_caches=None, block_table=None, seqlens=None):
        """One step through the ops: the schedule once, then every layer. [(out, lse)] per layer."""
        torch, ops = self.torch, self.ops
        qs = self.qs if qs is None else qs
        k_caches = self.k_caches if k_caches is None else k_caches
        block_table = self.block_table if block_table is None else block_table
        seqlens = self.seqlens if seqlens is None else seqlens
        sched, splits = torch.ops.mla_cupy.get_mla_metadata(seqlens, self.rows, 1)
        return [ops.flash_mla_with_kvcache(q, k, block_table, seqlens, 512, sched, splits, causal=True)
                for q, k in zip(qs, k_caches)]

    def check_layer0_against_reference(self, out, lse, what):
        torch, h = self.torch, self.host
        q = self.qs[0].view(torch.int16).cpu().numpy().view(h.q.dtype)
        out_ref, lse_ref = flash_mla_with_kvcache_reference(q, h.k_cache, h.block_table,
                                                            self.seqlens.cpu().numpy(), 512, causal=True)
        out_host = out.view(torch.int16).cpu().numpy().view(h.q.dtype)
        assert_mla_close(out_host, lse.cpu().numpy(), out_ref, lse_ref, std=h.std, msg=f"{what}: {self.context}")

    def update_in_place(self, seed):
        """The next step's values written into the same tensors: new queries, shorter sequences
        (still inside the pages their block-table rows list)."""
        torch = self.torch
        rng = np.random.default_rng(seed)
        shorter = np.maximum(self.host.cache_seqlens - rng.integers(0, 200, size=self.host.cache_seqlens.size), 1)
        self.seqlens.copy_(torch.from_numpy(shorter.astype(np.int32)))
        gen = torch.Generator(device="cuda").manual_seed(seed)
        for q in self.qs:
            q.copy_(self.random_like(q, gen))


def assert_same_bits(torch, got, want, what):
    """[(out, lse)] per layer, equal bit for bit (NaN, +inf included)."""
    assert len(got) == len(want), what
    for layer, ((out, lse), (out_w, lse_w)) in enumerate(zip(got, want)):
        assert out.shape == out_w.shape and out.dtype == out_w.dtype, f"{what}: layer {layer} out"
        assert torch.equal(out.view(torch.int16), out_w.view(torch.int16)), f"{what}: layer {layer} out differs"
        assert torch.equal(lse.view(torch.int32), lse_w.view(torch.int32)), f"{what}: layer {layer} lse differs"


def poison(torch, results):
    for out, lse in results:
        out.view(torch.int16).fill_(-1)  # 0xFFFF: NaN in bfloat16 and in float16
        lse.fill_(float("nan"))


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_ops_match_the_library_and_the_reference(torch, ops, dtype):
    import mla_cupy

    step = Step(torch, ops, 1, 4, 2, 64, dtype, case_seed("eager", dtype))
    q, k_cache, block_table, seqlens = step.qs[0], step.k_caches[0], step.block_table, step.seqlens
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the ops run on torch's current stream
        sched, splits = ops.get_mla_metadata(seqlens, 128, 1, 64)
        out, lse = ops.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, sched, splits, None, True)
        lib_sched, lib_splits = mla_cupy.get_mla_metadata(seqlens, 128, 1, 64)
        lib = mla_cupy.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, lib_sched, lib_splits,
                                              causal=True)
    side.synchronize()
    for x in (sched, splits, out, lse):
        assert isinstance(x, torch.Tensor) and x.device == q.device
    assert sched.dtype == splits.dtype == torch.int32 and splits.shape == (5,)
    assert out.dtype == q.dtype and out.shape == (4, 2, 64, 512)
    assert lse.dtype == torch.float32 and lse.shape == (4, 64, 2)
    assert torch.equal(sched, lib_sched) and torch.equal(splits, lib_splits), step.context
    assert_same_bits(torch, [(out, lse)], [lib], f"op vs library: {step.context}")
    step.check_layer0_against_reference(out, lse, "op")


def test_opcheck(torch, ops):
    step = Step(torch, ops, 1, 3, 1, 128, "bfloat16", case_seed("opcheck"))
    args = (step.seqlens, 128, 1)
    results = torch.library.opcheck(ops.get_mla_metadata, args)
    assert set(results.values()) == {"SUCCESS"}, results
    sched, splits = ops.get_mla_metadata(*args)
    results = torch.library.opcheck(ops.flash_mla_with_kvcache, (step.qs[0], step.k_caches[0], step.block_table,
                                                                  step.seqlens, 512, sched, splits), {"causal": True})
    assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compile_fullgraph_matches_eager(torch, ops, dtype):
    step = Step(torch, ops, 3, 5, 2, 16, dtype, case_seed("compile", dtype))

    def decode(qs, k_caches, block_table, seqlens):
        results = step(qs, k_caches, block_table, seqlens)
        # Ordinary torch work on the results, compiled with them.
        norms = torch.stack([out.float().square().mean() + lse.sum() for out, lse in results])
        return results, norms

    torch._dynamo.reset()
    compiled = torch.compile(decode, fullgraph=True)
    got, got_norms = compiled(*step.args())
    want, want_norms = decode(*step.args())
    torch.cuda.synchronize()
    assert_same_bits(torch, got, want, f"torch.compile vs eager: {step.context}")
    torch.testing.assert_close(got_norms, want_norms, msg=step.context)
    step.check_layer0_against_reference(*got[0], "torch.compile")
    torch._dynamo.reset()


def test_cuda_graph_capture_and_replay(torch, ops):
    step = Step(torch, ops, 4, 8, 1, 128, "bfloat16", case_seed("cuda graph"))
    capture_stream = torch.cuda.Stream()
    capture_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(capture_stream):
        step()  # eager, on the capture stream: compiles and loads the kernels, sizes the workspace
    torch.cuda.current_stream().wait_stream(capture_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=capture_stream):
        static = step()

    def check(what):
        poison(torch, static)  # every value must come from the replay
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        assert_same_bits(torch, static, eager, f"graph replay {what}: {step.context}")

    check("as captured")
    step.update_in_place(case_seed("cuda graph", "update"))
    check("after an in-place update")
    step.check_layer0_against_reference(*static[0], "graph replay after an in-place update")


def test_compile_reduce_overhead_matches_eager(torch, ops):
    step = Step(torch, ops, 3, 6, 2, 64, "bfloat16", case_seed("reduce-overhead"))
    def decode(qs, k_caches, block_table, seqlens):
        return step(qs, k_caches, block_table, seqlens)

    torch._dynamo.reset()
    compiled = torch.compile(decode, mode="reduce-overhead", fullgraph=True)
    for call in range(4):  # warm-up, capture, replays
        if call == 3:
            step.update_in_place(case_seed("reduce-overhead", "update"))
        got = [(out.clone(), lse.clone()) for out, lse in compiled(*step.args())]
        want = step(*step.args())
        torch.cuda.synchronize()
        assert_same_bits(torch, got, want, f"reduce-overhead call {call}: {step.context}")
    step.check_layer0_against_reference(*got[0], "reduce-overhead after an in-place update")
    torch._dynamo.reset()
