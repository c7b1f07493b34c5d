"""The benchmark's pure parts: work formulas, sweep, input layout, table and JSON lines."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mla_cupy import bench

pytestmark = pytest.mark.cpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- work per call ---

def test_flops_hand_computed():
    # two sequences of 3 and 5 tokens, s_q 2, h_q 4, d 8, dv 4:
    # 2*4*3*2*(8+4) + 2*4*5*2*(8+4) = 576 + 960
    assert bench.decode_flops([3, 5], s_q=2, h_q=4, d=8, dv=4) == 1536


def test_bytes_hand_computed():
    # b = 2: KV (3+5)*1*8*2 = 128; q 2*2*4*8*2 = 256; out 2*2*4*4*2 = 128
    assert bench.decode_bytes([3, 5], s_q=2, h_q=4, d=8, dv=4, h_kv=1) == 512
    # h_kv scales only the KV part
    assert bench.decode_bytes([3, 5], s_q=2, h_q=4, d=8, dv=4, h_kv=2) == 512 + 128


def test_work_matches_published_throughputs():
    # FlashMLA's b128 s_q1 h16 (158 us = 3.85 TB/s) and b128 s_q1 h128 (249 us = 586 TFLOP/s)
    flops, nbytes = bench.config_work(bench.BenchConfig(b=128, s_q=1, h_q=16, seqlen=4096))
    assert nbytes / 158e-6 / 1e12 == pytest.approx(3.85, abs=0.01)
    flops, _ = bench.config_work(bench.BenchConfig(b=128, s_q=1, h_q=128, seqlen=4096))
    assert flops / 249e-6 / 1e12 == pytest.approx(586, abs=1)


def test_work_uses_exact_integers_for_large_problems():
    flops, nbytes = bench.config_work(bench.BenchConfig(b=1, s_q=1, h_q=128, seqlen=1 << 20))
    assert isinstance(flops, int) and isinstance(nbytes, int)
    assert flops == 128 * (1 << 20) * 2 * (576 + 512)


def test_derive_rates():
    tbps, tflops, pct_bw, pct_mma = bench.derive_rates(2e12, 1e12, 1e6, 4.0, 800.0)
    assert (tbps, tflops) == pytest.approx((1.0, 2.0))
    assert (pct_bw, pct_mma) == pytest.approx((25.0, 0.25))
    assert bench.derive_rates(1, 1, None) == (None, None, None, None)
    assert bench.derive_rates(1, 1, 10.0)[2:] == (None, None)


# --- sweep ---

def test_standard_sweep_contents():
    names = [c.name for c in bench.standard_sweep()]
    assert len(names) == len(set(names)) == 19
    for varlen in ("", " varlen"):
        for s_q in (1, 2):
            for h_q in (16, 32, 64, 128):
                assert f"b128 s_q{s_q} h{h_q}{varlen}" in names
    for extra in ("b1 s_q1 h128 64K", "b8 s_q1 h128 64K", "b1 s_q1 h128 1M"):
        assert extra in names
    for c in bench.standard_sweep():
        assert (c.h_kv, c.d, c.dv, c.page, c.causal) == (1, 576, 512, 64, True)


def test_quick_sweep_is_a_subset():
    quick = [c.name for c in bench.quick_sweep()]
    assert quick == ["b128 s_q1 h16", "b128 s_q2 h128", "b128 s_q1 h128 varlen",
                     "b1 s_q1 h128 64K"]
    assert set(quick) <= {c.name for c in bench.standard_sweep()}


def test_seqlens():
    uniform = bench.BenchConfig(b=128, s_q=1, h_q=16, seqlen=4096).seqlens()
    assert uniform.dtype == np.int32 and (uniform == 4096).all()
    cfg = bench.BenchConfig(b=128, s_q=1, h_q=16, seqlen=4096, varlen=True)
    a, b = cfg.seqlens(), cfg.seqlens()
    assert a.dtype == np.int32 and a.shape == (128,)
    assert (a == b).all()                      # seeded: the same every time
    assert (a >= 1).all() and len(set(a.tolist())) > 100
    assert 3500 < a.mean() < 4700 and 700 < a.std() < 1300
    # clipping: a wide distribution still never gives a length below 1
    wide = bench.BenchConfig(b=256, s_q=1, h_q=16, seqlen=10, varlen=True, seqlen_std=1000)
    assert wide.seqlens().min() == 1
    other = bench.BenchConfig(b=128, s_q=1, h_q=16, seqlen=4096, varlen=True, seed=1)
    assert (other.seqlens() != a).any()


def test_configs_sharing_kv_are_grouped():
    groups = bench.group_by_kv(bench.standard_sweep())
    assert [len(g) for _, g in groups] == [8, 8, 1, 1, 1]
    keys = [k for k, _ in groups]
    assert len(keys) == len(set(keys))
    for key, group in groups:
        assert all(c.kv_key == key for c in group)
        lens = [c.seqlens() for c in group]
        assert all((x == lens[0]).all() for x in lens)


def test_labels():
    assert bench.tokens_label(4096) == "4K"
    assert bench.tokens_label(65536) == "64K"
    assert bench.tokens_label(1 << 20) == "1M"
    assert bench.tokens_label(1000) == "1000"


# --- input layout ---

def test_input_sets_cover_a_gib():
    for cfg in bench.standard_sweep():
        per_set = bench.kv_read_bytes(cfg.seqlens(), cfg.h_kv, cfg.d)
        n = bench.input_sets_needed(per_set)
        assert n * per_set >= bench.GIB
        assert n == 1 or (n - 1) * per_set < bench.GIB      # no more than needed
    assert bench.input_sets_needed(0) == 1
    assert bench.input_sets_needed(1, max_sets=8) == 8


def test_block_table_is_a_permutation_of_the_pool():
    lens = np.array([1, 64, 65, 200, 7], dtype=np.int32)
    table, num_blocks = bench.build_block_table(lens, 64, np.random.default_rng(0))
    pages = bench.pages_per_seq(lens, 64)
    assert pages.tolist() == [1, 1, 2, 4, 1]
    assert table.dtype == np.int32 and table.shape == (5, 4)
    assert num_blocks == 9
    used = np.concatenate([table[i, :n] for i, n in enumerate(pages)])
    assert sorted(used.tolist()) == list(range(num_blocks))
    assert ((table >= 0) & (table < num_blocks)).all()
    again, _ = bench.build_block_table(lens, 64, np.random.default_rng(1))
    assert (again != table).any()                                # random order


# --- records, table, JSON ---

def _sample_record(**overrides):
    cfg = bench.BenchConfig(b=128, s_q=1, h_q=128, seqlen=4096, varlen=True)
    ours = bench.summarize_times([250.0, 251.0, 249.0], [60.0, 61.0, 59.0], True)
    peer = bench.summarize_times([300.0, 301.0, 299.0], [80.0, 81.0, 79.0], True)
    fi = bench.summarize_times([280.0, 281.0, 279.0], [90.0, 91.0, 89.0], True)
    meta = bench.summarize_times([5.0, 6.0, 4.0], [20.0, 21.0, 19.0], True)
    kw = dict(iters=3, input_sets=2, distinct_kv_bytes=2 * bench.GIB, bw_roof_tbps=4.5,
              mma_roof_tflops=770.0, diffs=(1.5e-5, 2e-6), flashinfer=fi,
              fi_diffs=(2.5e-5, 3e-6))
    kw.update(overrides)
    return bench.make_result(cfg, ours, peer, meta, **kw)


def test_result_schema():
    rec = _sample_record()
    assert tuple(rec) == bench.RESULT_KEYS
    assert rec["kind"] == "result" and rec["config"] == "b128 s_q1 h128 varlen"
    assert rec["us"] == 250.0 and rec["peer_us"] == 300.0 and rec["fi_us"] == 280.0
    assert rec["kernel"] == "auto"
    assert rec["best_peer"] == "FlashInfer" and rec["best_peer_us"] == 280.0
    assert rec["speed_ratio"] == pytest.approx(280 / 250)     # best peer / ours
    assert rec["speed_ratio_flashmla"] == pytest.approx(1.2)
    assert rec["speed_ratio_flashinfer"] == pytest.approx(1.12)
    assert rec["target_met"] is True                            # 250 <= 0.95 * 280
    assert rec["max_abs_diff_out"] == 1.5e-5 and rec["fi_max_abs_diff_out"] == 2.5e-5
    assert rec["fi_max_abs_diff_lse"] == 3e-6 and rec["peer_us_min"] == 299.0
    assert rec["host_us"] == 60.0 and rec["meta_us"] == 5.0
    flops, nbytes = bench.config_work(bench.BenchConfig(b=128, s_q=1, h_q=128, seqlen=4096,
                                                        varlen=True))
    assert rec["tflops"] == pytest.approx(flops / 250e-6 / 1e12)
    assert rec["pct_bw_roof"] == pytest.approx(100 * nbytes / 250e-6 / 1e12 / 4.5)
    line = bench.json_line(rec)
    assert "\n" not in line
    back = json.loads(line)
    assert list(back) == list(bench.RESULT_KEYS)
    assert back["flops"] == flops and back["total_tokens"] == int(rec["total_tokens"])


def test_failed_record_is_valid_json():
    cfg = bench.BenchConfig(b=1, s_q=1, h_q=128, seqlen=1 << 20)
    rec = bench.make_result(cfg, error="RuntimeError: boom", iters=30)
    back = json.loads(bench.json_line(rec))
    assert back["error"] == "RuntimeError: boom"
    assert back["us"] is None and back["speed_ratio"] is None
    assert back["target_met"] is None and back["best_peer"] is None
    nan = dict(rec, max_abs_diff_out=float("nan"), max_abs_diff_lse=np.float32(np.inf))
    back = json.loads(bench.json_line(nan))            # strict JSON: NaN/inf become null
    assert back["max_abs_diff_out"] is None and back["max_abs_diff_lse"] is None


def test_header_line_schema():
    header = {k: None for k in bench.HEADER_KEYS}
    header.update(kind="header", schema=bench.SCHEMA_VERSION, gpu="NVIDIA H200", sm_count=132,
                  bw_roof_tbps=4.57, mma_roof_tflops=772.0, mma_roof_dtype="bfloat16")
    back = json.loads(bench.json_line(header))
    assert back["kind"] == "header" and back["schema"] == bench.SCHEMA_VERSION
    lines = bench.format_env(header)
    text = "\n".join(lines)
    assert "NVIDIA H200" in text and "132 SMs" in text and "4.57 TB/s" in text
    assert "772 TFLOP/s" in text and "bfloat16" in text


def test_table_alignment():
    records = [_sample_record(),
               bench.make_result(bench.BenchConfig(b=128, s_q=1, h_q=16, seqlen=4096)),
               _sample_record(diffs=(float("nan"), None))]
    lines = bench.format_table(records)
    titles, rule, rows = lines[0], lines[1], lines[2:]
    for title in ("config", "µs", "TB/s", "TFLOP/s", "%BW-roof", "%MMA-roof", "FlashMLA µs",
                  "FlashInfer µs", "ratio", "target", "host µs", "meta µs", "max|Δout|"):
        assert title in titles
    assert "kernel" not in titles                              # only 'auto': no kernel column
    assert set(rule) == {"-"} and len(rule) == len(titles)
    assert all(len(r) == len(titles) for r in rows)
    # every column ends at the same place in every line
    ends = [titles.index("TB/s") + len("TB/s"), titles.index("host µs") + len("host µs")]
    for r in rows:
        for e in ends:
            assert r[e - 1] != " " and (e == len(r) or r[e] == " ")
    assert rows[0].startswith("b128 s_q1 h128 varlen")
    assert "250.0" in rows[0] and "1.120" in rows[0] and " yes " in rows[0]
    assert rows[1].split()[4] == "-"                            # missing values as '-'


def test_table_fits_a_screen():
    names = [c.name for c in bench.sweep_configs("all")]
    cols = bench.table_columns(max(len(n) for n in names), kernel_column=True)
    assert len(bench.format_header(cols)[0]) <= 150
    recs = [_sample_record(kernel="portable"), _sample_record(kernel="sm90")]
    lines = bench.format_table(recs)
    assert "kernel" in lines[0]
    assert lines[2].split()[4] == "portable" and lines[3].split()[4] == "sm90"
    assert all(len(line) <= 150 for line in lines)


def test_error_rows_carry_the_message():
    cols = bench.table_columns(24)
    rec = bench.make_result(bench.BenchConfig(b=8, s_q=1, h_q=128, seqlen=65536),
                            error="ValueError: bad")
    line = bench.format_row(rec, cols)
    assert line.startswith("b8 s_q1 h128 64K") and line.endswith("ERROR: ValueError: bad")
    width = len(bench.format_header(cols)[0])
    assert line[width:].startswith(bench.COLUMN_SEP)


def test_short_error():
    msg = bench.short_error(ValueError("line one\nline two"))
    assert msg == "ValueError: line one line two"
    assert len(bench.short_error(RuntimeError("x" * 500), limit=50)) == 50


# --- command line ---

def test_parse_args_defaults():
    args = bench.parse_args([])
    assert args.iters == bench.DEFAULT_ITERS >= 30 and args.json is None and not args.quick
    assert args.peer == os.path.join(".peers", "flashmla")
    args = bench.parse_args(["--quick", "--iters", "40", "--json", "r.jsonl", "--peer", "p"])
    assert (args.quick, args.iters, args.json, args.peer) == (True, 40, "r.jsonl", "p")
    assert bench.parse_args(["--quick"]).iters == bench.QUICK_ITERS >= 30


def test_select_configs_filter():
    args = bench.parse_args(["--filter", "64K"])
    assert [c.name for c in bench.select_configs(args)] == ["b1 s_q1 h128 64K",
                                                              "b8 s_q1 h128 64K"]


# --- imports ---

def test_module_level_imports_are_light():
    tree = ast.parse((ROOT / "mla_cupy" / "bench.py").read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert not top & {"cupy", "torch", "jax", "cupyx"}


def test_import_does_not_load_torch():
    code = "import sys, mla_cupy.bench; print('torch' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"


def test_impossible_timings_are_flagged():
    cfg = bench.BenchConfig(b=128, s_q=1, h_q=16, seqlen=4096)
    _, nbytes = bench.config_work(cfg)
    assert bench.beats_roof(nbytes, 1.3, 4.5)
    assert not bench.beats_roof(nbytes, 158.0, 4.5)
    assert not bench.beats_roof(nbytes, 1.3, None)
    fast = bench.summarize_times([1.3], [60.0], True)
    slow = bench.summarize_times([158.0], [60.0], True)
    rec = bench.make_result(cfg, slow, fast, bw_roof_tbps=4.5)
    assert rec["suspect"].startswith("FlashMLA faster than the read roof")
    assert "timing suspect" in bench.format_row(rec, bench.table_columns(20))
    assert bench.make_result(cfg, slow, slow, bw_roof_tbps=4.5)["suspect"] is None


# --- peers, ratio and target ---

def test_best_peer_ratio_and_target():
    assert bench.best_peer({"FlashMLA": 158.0, "FlashInfer": 151.0}) == ("FlashInfer", 151.0)
    assert bench.best_peer({"FlashMLA": 158.0, "FlashInfer": None}) == ("FlashMLA", 158.0)
    assert bench.best_peer({"FlashMLA": None, "FlashInfer": None}) == (None, None)
    assert bench.speed_ratio(151.0, 100.0) == pytest.approx(1.51)
    assert bench.speed_ratio(None, 100.0) is None and bench.speed_ratio(151.0, None) is None
    assert bench.TARGET_FRACTION == 0.95
    assert bench.target_met(95.0, 100.0) is True                 # exactly 0.95 x best peer
    assert bench.target_met(95.1, 100.0) is False
    assert bench.target_met(None, 100.0) is None and bench.target_met(90.0, None) is None


def test_ratio_uses_the_best_peer_and_only_flashmla_when_alone():
    cfg = bench.BenchConfig(b=128, s_q=1, h_q=16, seqlen=4096)
    ours = bench.summarize_times([151.0], [30.0], True)
    fm = bench.summarize_times([158.0], [80.0], True)
    rec = bench.make_result(cfg, ours, fm)
    assert rec["best_peer"] == "FlashMLA" and rec["fi_us"] is None
    assert rec["speed_ratio"] == pytest.approx(158 / 151)
    assert rec["target_met"] is False                           # 151 > 0.95 * 158 = 150.1
    assert bench.make_result(cfg, ours)["target_met"] is None


def test_flashinfer_csr_metadata():
    lens = np.array([1, 64, 65, 200], dtype=np.int32)
    table, _ = bench.build_block_table(lens, 64, np.random.default_rng(3))
    qo, kv_indptr, ids, kv_lens = bench.flashinfer_csr(lens, table, s_q=2, page=64)
    assert qo.tolist() == [0, 2, 4, 6, 8]
    assert kv_indptr.tolist() == [0, 1, 2, 4, 8]
    assert ids.tolist() == (table[0, :1].tolist() + table[1, :1].tolist()
                            + table[2, :2].tolist() + table[3, :4].tolist())
    assert kv_lens.tolist() == lens.tolist()
    assert all(x.dtype == np.int32 for x in (qo, kv_indptr, ids, kv_lens))


def test_parse_kernels():
    assert bench.parse_kernels("auto") == ["auto"]
    assert bench.parse_kernels("sm90, portable,sm90") == ["sm90", "portable"]
    for bad in ("", "fast", "auto,cuda"):
        with pytest.raises(ValueError):
            bench.parse_kernels(bad)
    assert bench.parse_args([]).kernel_list == ["auto"]
    assert bench.parse_args(["--kernels", "auto,portable"]).kernel_list == ["auto", "portable"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--kernels", "nope"])


def test_kernels_available_without_forcing(monkeypatch):
    assert bench.kernels_available(["auto"]) == (["auto"], None)
    import mla_cupy
    fake = type(sys)("mla_cupy._select")                      # a _select without forced()
    monkeypatch.setitem(sys.modules, "mla_cupy._select", fake)
    monkeypatch.setattr(mla_cupy, "_select", fake, raising=False)
    kinds, note = bench.kernels_available(["sm90", "portable"])
    assert kinds == ["auto"] and "auto only" in note
    fake.forced = lambda kind: None
    assert bench.kernels_available(["sm90", "portable"]) == (["sm90", "portable"], None)


def test_flashinfer_option():
    assert bench.parse_args([]).flashinfer is True
    assert bench.parse_args(["--no-flashinfer"]).flashinfer is False


# --- extra sweep ---

def test_extra_sweep_contents():
    configs = bench.extra_sweep()
    names = [c.name for c in configs]
    assert len(names) == len(set(names))
    assert not set(names) & {c.name for c in bench.standard_sweep()}
    assert "b64 s_q1 h16 1K+16K/8" in names
    assert "b128 s_q4 h16" in names and "b128 s_q4 h32" in names
    assert "b4 s_q1 h128 8K" in names and "b32 s_q1 h16 32K" in names
    for c in configs:
        assert (c.h_kv, c.d, c.dv, c.page, c.causal) == (1, 576, 512, 64, True)
    keys = [k for k, _ in bench.group_by_kv(configs)]
    assert len(keys) == len(set(keys))                          # configs sharing KV adjacent


def test_skewed_seqlens():
    cfg = bench.BenchConfig(b=64, s_q=1, h_q=16, seqlen=1024, long_seqlen=16384, long_every=8)
    lens = cfg.seqlens()
    assert lens.dtype == np.int32 and lens.shape == (64,)
    assert (lens[7::8] == 16384).all() and (np.delete(lens, np.s_[7::8]) == 1024).all()
    assert bench.config_work(cfg)[0] == 16 * (56 * 1024 + 8 * 16384) * 2 * (576 + 512)
    plain = bench.BenchConfig(b=64, s_q=1, h_q=16, seqlen=1024)
    assert cfg.kv_key != plain.kv_key


def test_sweep_selection():
    def names(argv):
        return [c.name for c in bench.select_configs(bench.parse_args(argv))]
    standard = [c.name for c in bench.standard_sweep()]
    extra = [c.name for c in bench.extra_sweep()]
    assert names([]) == standard
    assert names(["--sweep", "extra"]) == extra
    assert names(["--sweep", "all"]) == standard + extra
    assert names(["--quick"]) == [c.name for c in bench.quick_sweep()]
    args = bench.parse_args(["--quick", "--sweep", "extra"])
    assert args.iters == bench.QUICK_ITERS and names(["--quick", "--sweep", "extra"]) == extra
    assert names(["--sweep", "all", "--filter", "s_q4"]) == ["b128 s_q4 h16", "b128 s_q4 h32"]
    with pytest.raises(ValueError):
        bench.sweep_configs("huge")


# --- orchestration, with NumPy standing in for CuPy and fakes for the GPU pieces ---

def _fake_cp():
    import types

    class Stream:
        ptr = 1

        def synchronize(self):
            pass

    def rs(seed):
        rng = np.random.default_rng(seed)
        return types.SimpleNamespace(
            standard_normal=lambda shape, dtype: rng.standard_normal(shape).astype(dtype))
    return types.SimpleNamespace(
        random=types.SimpleNamespace(RandomState=rs), float32=np.float32, uint32=np.uint32,
        uint16=np.uint16, int16=np.int16, dtype=np.dtype, max=np.max, abs=np.abs,
        asarray=lambda x, dtype=None: np.asarray(x, dtype=dtype),
        cuda=types.SimpleNamespace(get_current_stream=lambda: Stream()))


def test_run_config_alternates_kinds_and_peers(monkeypatch):
    pytest.importorskip("ml_dtypes")
    import contextlib
    import types
    import ml_dtypes
    import mla_cupy

    order = []

    class Timer:
        stream = types.SimpleNamespace(ptr=1)

        def run(self, fn, n, est):
            tag = fn(0)
            order.append(tag if isinstance(tag, str) else "ours")
            return bench._Samples([100.0] * n, [10.0] * n, True)

    forced = []
    select = types.ModuleType("mla_cupy._select")

    @contextlib.contextmanager
    def force(kind):
        forced.append(kind)
        yield
    select.forced = force
    monkeypatch.setitem(sys.modules, "mla_cupy._select", select)
    monkeypatch.setattr(mla_cupy, "_select", select, raising=False)

    def decode(q, k, table, lens, dv, sched, splits, softmax_scale, causal):
        b, s_q, h_q, _ = q.shape
        return (np.zeros((b, s_q, h_q, dv), ml_dtypes.bfloat16),
                np.zeros((b, h_q, s_q), np.float32))
    api = (lambda lens, q_per_k, h_kv: ("sched", "splits"), decode)

    class Peer:
        def __init__(self, name, value):
            self.name, self.value = name, value

        def prepare(self, cfg, qs, kv_sets, lens, scale):
            def result(_):
                out = np.full((cfg.b, cfg.s_q, cfg.h_q, cfg.dv), self.value, ml_dtypes.bfloat16)
                lse = np.full((cfg.b, cfg.h_q, cfg.s_q), self.value / 2, np.float32)
                return out, lse
            return (lambda k: self.name), result

    cp = _fake_cp()
    cfg = bench.BenchConfig(b=4, s_q=2, h_q=16, seqlen=512)
    kv = bench._make_kv_sets(cp, cfg, 2, 0)
    args = bench.parse_args(["--iters", "3", "--kernels", "sm90,portable"])
    peers = {"FlashMLA": Peer("FlashMLA", 0.5), "FlashInfer": Peer("FlashInfer", 0.25)}
    recs = bench._run_config(cp, cfg, kv, Timer(), args, (4.5, 770.0), api, None, peers,
                             ["sm90", "portable"])
    assert [r["kernel"] for r in recs] == ["sm90", "portable"]
    assert forced == ["sm90", "portable", "sm90", "portable"]         # two rounds
    # round 1: per kind our call and get_mla_metadata, then each peer; round 2: the calls again
    assert order == ["ours"] * 4 + ["FlashMLA", "FlashInfer"] + ["ours"] * 2 + ["FlashMLA",
                                                                               "FlashInfer"]
    for r in recs:
        assert r["us"] == r["peer_us"] == r["fi_us"] == 100.0
        assert r["speed_ratio"] == 1.0 and r["target_met"] is False
        assert (r["max_abs_diff_out"], r["max_abs_diff_lse"]) == (0.5, 0.25)
        assert (r["fi_max_abs_diff_out"], r["fi_max_abs_diff_lse"]) == (0.25, 0.125)
        assert r["error"] is r["peer_error"] is r["fi_error"] is None
        assert r["input_sets"] == 2
    failed = bench._run_config(cp, cfg, kv, Timer(), args, (4.5, 770.0), None, "ImportError: x",
                               {"FlashMLA": None, "FlashInfer": None}, ["auto"])
    assert [r["error"] for r in failed] == ["ImportError: x"] and failed[0]["us"] is None
