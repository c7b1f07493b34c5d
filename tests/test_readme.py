"""The README's tables and set-up commands agree with the code they describe."""

import pathlib
import re

import pytest

from mla_cupy import _env, _sm90, support

pytestmark = pytest.mark.cpu

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SETUP_PREFIX = "python3 -m venv .venv && "


def section(title):
    """Text of the README section headed ``## title`` (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def table_rows(text):
    """The body rows of the first Markdown table in ``text``, as lists of stripped cells."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) >= 3, "expected a Markdown table (header, rule, rows)"
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in rows[2:]]


def matrix_row(key):
    rows = [cells for cells in table_rows(section("Support matrix")) if key in cells[0]]
    assert len(rows) == 1, f"support matrix: expected one row for {key!r}, found {len(rows)}"
    return rows[0][1]


def test_head_dims_match_support():
    found = re.findall(r"(\d+) / (\d+)", matrix_row("head_dim"))
    pairs = tuple((int(d), int(dv)) for d, dv in found)
    assert pairs == support.HEAD_DIMS


def test_dtypes_match_support():
    names = tuple(re.findall(r"[a-z]+\d+", matrix_row("dtype of")))
    assert names == support.DTYPES


def test_page_block_size_range_matches_support():
    match = re.fullmatch(r"(\d+) to (\d+)", matrix_row("page_block_size"))
    assert match, "page_block_size row should read 'MIN to MAX'"
    assert (int(match[1]), int(match[2])) == (support.MIN_PAGE_BLOCK_SIZE,
                                              support.MAX_PAGE_BLOCK_SIZE)


def test_compute_capability_matches_support():
    match = re.search(r"compute capability (\d+)\.(\d+) or newer", matrix_row("GPU"))
    assert match
    assert (int(match[1]), int(match[2])) == support.MIN_COMPUTE_CAPABILITY


def test_auxiliary_dtypes_match_support():
    assert matrix_row("block_table") == support.INDEX_DTYPE
    assert matrix_row("`lse`") == support.LSE_DTYPE


def _documented_env_vars():
    rows = table_rows(_env.__doc__)
    return [cells[0].strip("`") for cells in rows]


def test_env_docstring_lists_what_the_code_reads():
    source = (ROOT / "mla_cupy" / "_env.py").read_text(encoding="utf-8")
    code = source.split('"""', 2)[2]  # everything after the module docstring
    read = sorted(set(re.findall(r'"(MLA_CUPY_[A-Z0-9_]+)"', code)))
    assert sorted(_documented_env_vars()) == read


def test_readme_env_table_matches_env_docstring():
    rows = table_rows(section("Environment variables"))
    readme_vars = [cells[0].strip("`") for cells in rows]
    assert all(name.startswith("MLA_CUPY_") for name in readme_vars), readme_vars
    assert sorted(readme_vars) == sorted(_documented_env_vars())


def setup_commands():
    return [line for line in README.splitlines() if line.startswith(SETUP_PREFIX)]


def test_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2, commands
    quickstart, tests = sorted(commands, key=lambda c: c.endswith("&& pytest"))
    assert quickstart.endswith("&& python examples/quickstart.py"), quickstart
    assert tests.endswith("&& pytest"), tests
    assert '".[cuda12]"' in quickstart and '".[cuda12,test]"' in tests


def test_ci_runs_the_readme_test_command():
    # .ci/run picks the test command out of the README with `grep -E '<pattern>'`: the same
    # pattern must find exactly the README's test command.
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    patterns = re.findall(r"grep -E '([^']+)' \"\$repo/README.md\"", ci)
    assert len(patterns) == 1, patterns
    found = [line for line in README.splitlines() if re.search(patterns[0], line)]
    tests = [c for c in setup_commands() if c.endswith("&& pytest")]
    assert found == tests and len(found) == 1, found


def test_examples_named_in_readme_exist():
    for name in re.findall(r"`(\w+\.py)`", section("Usage")):
        assert (ROOT / "examples" / name).is_file(), name


def test_performance_section_has_the_table_marker_or_a_table():
    text = section("Performance")
    assert "<!-- bench-table -->" in text or "|---" in text


def test_hopper_row_matches_the_sm90_family():
    row = matrix_row("Hopper kernel")
    cc = re.search(r"compute capability (\d+)\.(\d+)", row)
    assert cc and int(cc[1]) * 10 + int(cc[2]) == _sm90.COMPUTE_CAPABILITY
    pairs = tuple((int(d), int(dv)) for d, dv in re.findall(r"(\d+) / (\d+)", row))
    assert pairs == _sm90.HEAD_DIMS
    pages = re.search(r"`page_block_size` ((?:\d+, )*\d+) or a multiple of (\d+)", row)
    assert pages, row
    assert tuple(int(x) for x in pages[1].split(", ")) == _sm90.SMALL_PAGES
    assert int(pages[2]) == _sm90.TILE_TOKENS
