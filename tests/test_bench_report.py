"""The benchmark's results after the run, without a GPU: JSON lines read back, the plot
(``--plot``, ``--from-json``) and scripts/bench_report.py, which writes the README's performance
table from JSON lines with the benchmark's own table formatting.

tests/data/bench_readme.jsonl holds the results behind the README's table (rebuilt from the
table as printed: the displayed values, not the run's full precision). When the table is
updated from a new run (``python scripts/bench_report.py RUN.jsonl``), copy RUN.jsonl there.
tests/data/bench_readme_extra.jsonl does the same for the second table, the shapes outside the
standard sweep (``--marker bench-table-extra``).
"""

import importlib.util
import os
import pathlib
import struct
import subprocess
import sys
import textwrap

import pytest

from mla_cupy import bench

pytestmark = pytest.mark.cpu

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "bench_readme.jsonl"
EXTRA_FIXTURE = ROOT / "tests" / "data" / "bench_readme_extra.jsonl"
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("_script_bench_report",
                                                  ROOT / "scripts" / "bench_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fixture_records():
    return bench.read_json_lines(FIXTURE)


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300, **kwargs)


# ---- JSON lines ----------------------------------------------------------------------------------

def test_fixture_reads_back_as_the_bench_writes_it(fixture_records):
    header, records = fixture_records
    assert header["kind"] == "header" and header["schema"] == bench.SCHEMA_VERSION
    assert list(header) == list(bench.HEADER_KEYS)
    assert [r["config"] for r in records] == [c.name for c in bench.standard_sweep()]
    for rec in records:
        assert list(rec) == list(bench.RESULT_KEYS)
        assert rec["us"] > 0 and rec["peer_us"] > 0 and rec["fi_us"] > 0


def test_read_json_lines_names_a_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"kind": "header", "schema": 2}\n\n{"kind": "result", "config": "x"}\n'
                    "not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 4: not JSON"):
        bench.read_json_lines(path)
    path.write_text('{"kind": "result", "config": "x"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2: expected a JSON object, got list"):
        bench.read_json_lines(path)
    path.write_text('{"kind": "result", "config": "b1 x"}\n{"kind": "other"}\n'
                    '{"kind": "result", "config": "b2 y"}\n')
    header, records = bench.read_json_lines(path)
    assert header is None and [r["config"] for r in records] == ["b1 x", "b2 y"]
    assert [r["config"] for r in bench.filter_records(records, "y,z")] == ["b2 y"]
    assert bench.filter_records(records, None) == records


# ---- the README's table --------------------------------------------------------------------------

def test_readme_table_is_the_rendering_of_its_json_lines(report, fixture_records):
    text = README.read_text(encoding="utf-8")
    assert report.update_text(text, fixture_records[1]) == text, (
        "README.md's table after <!-- bench-table --> is not what bench.format_table makes of "
        f"{FIXTURE.relative_to(ROOT)}: update the table with `python scripts/bench_report.py "
        f"RUN.jsonl` and copy RUN.jsonl to {FIXTURE.relative_to(ROOT)}")


def test_readme_extra_table_is_the_rendering_of_its_json_lines(report):
    header, records = bench.read_json_lines(EXTRA_FIXTURE)
    assert header["kind"] == "header" and list(header) == list(bench.HEADER_KEYS)
    assert [r["config"] for r in records] == [c.name for c in bench.extra_sweep()]
    text = README.read_text(encoding="utf-8")
    assert report.update_text(text, records, "bench-table-extra") == text, (
        "README.md's table after <!-- bench-table-extra --> is not what bench.format_table makes "
        f"of {EXTRA_FIXTURE.relative_to(ROOT)}: update it with `python scripts/bench_report.py "
        f"RUN.jsonl --marker bench-table-extra` and copy RUN.jsonl to {EXTRA_FIXTURE.relative_to(ROOT)}")


def test_table_is_the_bench_table(report, fixture_records):
    records = fixture_records[1]
    assert report.render_table(records) == "\n".join(bench.format_table(records)) + "\n"


def test_rewrite_replaces_only_the_table_and_is_idempotent(report, fixture_records):
    text = README.read_text(encoding="utf-8")
    start, end = report.table_span(text)
    stale = text[:start] + "config  µs\n------\nold row\n" + text[end:]
    fresh = report.update_text(stale, fixture_records[1])
    assert fresh == text
    assert report.update_text(fresh, fixture_records[1]) == fresh
    # Fewer rows: everything outside the block stays byte for byte.
    some = bench.filter_records(fixture_records[1], "64K")
    short = report.update_text(text, some)
    s_start, s_end = report.table_span(short)
    assert short[:s_start] == text[:start] and short[s_end:] == text[end:]
    assert short[s_start:s_end].splitlines()[2:] == bench.format_table(some)[2:]
    assert report.update_text(short, some) == short


def test_table_span_refuses_what_it_cannot_place(report):
    with pytest.raises(report.ReportError, match="no line '<!-- bench-table -->'"):
        report.table_span("# t\n\ntext\n")
    with pytest.raises(report.ReportError, match="no fenced block"):
        report.table_span("<!-- bench-table -->\ntext\n\n## Next\n```\nx\n```\n")
    with pytest.raises(report.ReportError, match="not closed"):
        report.table_span("<!-- bench-table -->\n```\nrow\n")
    with pytest.raises(report.ReportError, match="2 lines"):
        report.table_span("<!-- bench-table -->\n<!-- bench-table -->\n```\n```\n")
    text = "intro\n<!-- t2 -->\nprose\n\n```\nold\n```\nafter\n"
    start, end = report.table_span(text, "t2")
    assert text[start:end] == "old\n"
    with pytest.raises(report.ReportError, match="no result lines"):
        report.render_table([])


def test_script_checks_and_rewrites_a_readme(tmp_path):
    text = README.read_text(encoding="utf-8")
    copy = tmp_path / "README.md"
    _, records = bench.read_json_lines(FIXTURE)
    shown = f"  {records[0]['speed_ratio']:.3f}      no"  # the first row's ratio and target as shown
    assert shown in text
    copy.write_text(text.replace(shown, "  0.999     yes"), encoding="utf-8")
    script = str(ROOT / "scripts" / "bench_report.py")
    check = _run([script, str(FIXTURE), "--readme", str(copy), "--check"])
    assert check.returncode == 1, check.stdout + check.stderr
    assert "-b128 s_q1 h16 " in check.stdout and "+b128 s_q1 h16 " in check.stdout
    assert copy.read_text(encoding="utf-8") != text  # --check changes nothing
    write = _run([script, str(FIXTURE), "--readme", str(copy)])
    assert write.returncode == 0, write.stdout + write.stderr
    assert "rewritten (19 rows)" in write.stdout and "NVIDIA H200" in write.stdout
    assert copy.read_text(encoding="utf-8") == text
    again = _run([script, str(FIXTURE), "--readme", str(copy), "--check"])
    assert again.returncode == 0 and "up to date (19 rows)" in again.stdout, again.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temporary left
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"kind": "header"}\n')
    bad = _run([script, str(empty), "--readme", str(copy)])
    assert bad.returncode == 2 and bad.stderr.startswith("bench_report: no result lines in ")


# ---- the plot ------------------------------------------------------------------------------------

def _png_size(path):
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_from_json_lines_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
    out = tmp_path / "plots" / "bench.png"
    assert bench.main(["--from-json", str(FIXTURE), "--plot", str(out)]) == 0
    width, height = _png_size(out)
    assert width > 800 and height > 600
    printed = capsys.readouterr().out
    assert "b1 s_q1 h128 1M" in printed and printed.rstrip().endswith(f"plot: {out}")
    # Several kernel kinds, one peer missing on a row: still a plot.
    _, records = bench.read_json_lines(FIXTURE)
    portable = [dict(r, kernel="portable", us=r["us"] * 1.5) for r in records[:3]]
    mixed = [dict(r, kernel="auto") for r in records[:3]] + portable
    mixed[0]["fi_us"] = None
    bench.plot_results(mixed, tmp_path / "kinds.png")
    assert _png_size(tmp_path / "kinds.png")[0] > 0
    # No peer at all: the times alone.
    alone = [dict(r, peer_us=None, fi_us=None) for r in records[:2]]
    bench.plot_results(alone, tmp_path / "alone.png")
    assert _png_size(tmp_path / "alone.png")[0] > 0


def test_plot_after_a_run(tmp_path, monkeypatch, capsys):
    # The run itself stands in for the GPU: it hands back the fixture's results.
    pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")
    import mla_cupy.testing

    header, records = bench.read_json_lines(FIXTURE)
    monkeypatch.setattr(mla_cupy.testing, "gpu_status", lambda: (True, "a stand-in GPU"))
    monkeypatch.setattr(bench, "run", lambda args, emit: (header, records[:4]))
    out = tmp_path / "run.png"
    assert bench.main(["--quick", "--plot", str(out)]) == 0
    assert _png_size(out)[0] > 0 and capsys.readouterr().out.endswith(f"plot: {out}\n")
    # A plot that cannot be written after the run: one line, status 1.
    assert bench.main(["--quick", "--plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"python -m mla_cupy.bench: --plot {tmp_path}: ") and err.count("\n") == 1


def test_plot_series():
    _, records = bench.read_json_lines(FIXTURE)
    configs, times, ratios = bench.plot_series(records[:2])
    assert configs == ["b128 s_q1 h16", "b128 s_q1 h32"]
    assert list(times) == ["mla_cupy", "FlashMLA", "FlashInfer"]
    assert times["mla_cupy"] == [148.9, 153.0] and times["FlashMLA"] == [157.1, 158.1]
    assert list(ratios) == ["FlashMLA / mla_cupy", "FlashInfer / mla_cupy"]
    assert ratios["FlashInfer / mla_cupy"][0] == pytest.approx(150.8 / 148.9)
    kinds = [dict(records[0], kernel="sm90"), dict(records[0], kernel="portable", us=200.0,
                                                   peer_us=None, fi_us=None)]
    configs, times, ratios = bench.plot_series(kinds)
    assert list(times) == ["mla_cupy (sm90)", "mla_cupy (portable)", "FlashMLA", "FlashInfer"]
    assert times["FlashMLA"] == [157.1]  # a peer's time is the configuration's, whatever the kind
    assert ratios["FlashMLA / mla_cupy (portable)"] == [pytest.approx(157.1 / 200.0)]
    _, times, ratios = bench.plot_series([dict(records[0], peer_us=None, fi_us=None)])
    assert list(times) == ["mla_cupy"] and ratios == {}


def test_plot_without_matplotlib_fails_before_anything_runs(tmp_path):
    # matplotlib blocked; the GPU probe and the JSON reader must not be reached.
    code = textwrap.dedent("""
        import sys
        sys.modules["matplotlib"] = None
        import mla_cupy.testing
        from mla_cupy import bench

        def never(*args, **kwargs):
            raise AssertionError("reached past the matplotlib check")
        mla_cupy.testing.gpu_status = bench.read_json_lines = bench.run = never
        sys.exit(bench.main(sys.argv[1:]))
    """)
    out = tmp_path / "b.png"
    for args in (["--quick", "--plot", str(out)],
                 ["--from-json", str(FIXTURE), "--plot", str(out)]):
        proc = _run(["-c", code, *args])
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("python -m mla_cupy.bench: --plot needs matplotlib, which "
                                      "cannot be imported (ModuleNotFoundError"), proc.stderr
        assert 'pip install ".[plot]"' in proc.stderr and proc.stderr.count("\n") == 1
    assert not out.exists()


def test_from_json_needs_no_gpu_and_reports_a_bad_file(tmp_path):
    proc = _run(["-m", "mla_cupy.bench", "--from-json", str(FIXTURE), "--filter", "64K,1M"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "mla_cupy decode benchmark" and any("NVIDIA H200" in x for x in lines)
    rows = [x for x in lines if x.startswith("b")]
    assert [r[:16].strip() for r in rows] == ["b1 s_q1 h128 64K", "b8 s_q1 h128 64K",
                                              "b1 s_q1 h128 1M"]
    missing = _run(["-m", "mla_cupy.bench", "--from-json", str(tmp_path / "none.jsonl")])
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.startswith("python -m mla_cupy.bench: --from-json: FileNotFoundError")
    nothing = _run(["-m", "mla_cupy.bench", "--from-json", str(FIXTURE), "--filter", "b999"])
    assert nothing.returncode == 2 and "no results in" in nothing.stderr
