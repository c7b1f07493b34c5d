"""Write the README's performance table from the benchmark's JSON lines, so that the two cannot
disagree.

    python -m mla_cupy.bench --json run.jsonl          # on the GPU machine
    python scripts/bench_report.py run.jsonl           # anywhere: rewrites README.md's table
    python scripts/bench_report.py run.jsonl --check   # exit status 1 if the table differs

The table is the fenced block (```` ``` ```` … ```` ``` ````) that follows the marker line
``<!-- bench-table -->`` in README.md, in the section's prose; everything else in the file is
left byte for byte as it is. It is rendered by the benchmark's own ``format_table`` from the
result lines (in their order; ``--filter`` keeps the configurations whose name contains one of
its comma-separated texts), so it reads exactly as the benchmark printed it. The text around
the table (date, GPU, versions) stays the maintainer's: the script prints the run's header to
help write it. ``--marker NAME`` picks another marker, ``<!-- NAME -->``, for a second table.

Exit status: 0 when the README is (now) up to date, 1 with ``--check`` when it is not, 2 on a
problem (no marker, no table after it, no results in the JSON lines).

To plot the same results: ``python -m mla_cupy.bench --from-json run.jsonl --plot run.png``.
"""

import argparse
import difflib
import os
import pathlib
import sys

try:
    from mla_cupy import bench
except ImportError:  # run from a checkout without installing: the package is one level up
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from mla_cupy import bench

DEFAULT_MARKER = "bench-table"
FENCE = "```"


class ReportError(Exception):
    """The README or the JSON lines cannot be used; the message says why."""


def table_span(text, marker=DEFAULT_MARKER):
    """(start, end) character offsets of the fenced table block's body (the lines between the
    two fences, with their newlines) following the line ``<!-- marker -->``. The block must
    come before the next Markdown heading."""
    tag = f"<!-- {marker} -->"
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    marks = [i for i, line in enumerate(lines) if line.strip() == tag]
    if not marks:
        raise ReportError(f"no line {tag!r} found")
    if len(marks) > 1:
        raise ReportError(f"{len(marks)} lines {tag!r}; expected one")
    opening = None
    for i in range(marks[0] + 1, len(lines)):
        stripped = lines[i].strip()
        if stripped.startswith("#"):
            break
        if stripped.startswith(FENCE):
            opening = i
            break
    if opening is None:
        raise ReportError(f"no fenced block ({FENCE}) after {tag!r} before the next heading")
    for j in range(opening + 1, len(lines)):
        if lines[j].strip() == FENCE:
            return offsets[opening + 1], offsets[j]
    raise ReportError(f"the fenced block after {tag!r} is not closed")


def render_table(records):
    """The table's lines, exactly as the benchmark prints them (bench.format_table)."""
    if not records:
        raise ReportError("no result lines to render")
    return "".join(line.rstrip() + "\n" for line in bench.format_table(records))


def update_text(text, records, marker=DEFAULT_MARKER):
    """`text` with the table after the marker replaced by the rendering of `records`."""
    start, end = table_span(text, marker)
    return text[:start] + render_table(records) + text[end:]


def load_records(path, filter_text=None):
    """(header, records) of a JSON lines file written by ``python -m mla_cupy.bench --json``."""
    try:
        header, records = bench.read_json_lines(path)
    except (OSError, ValueError) as exc:
        raise ReportError(str(exc)) from None
    records = bench.filter_records(records, filter_text)
    if not records:
        raise ReportError(f"no result lines in {path}"
                          + (f" matching --filter {filter_text!r}" if filter_text else ""))
    return header, records


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="scripts/bench_report.py",
                                description="Rewrite the README's performance table from the "
                                            "benchmark's JSON lines.")
    p.add_argument("json", metavar="JSONL", help="JSON lines written by python -m mla_cupy.bench "
                                                 "--json")
    p.add_argument("--readme", metavar="PATH",
                   default=str(pathlib.Path(__file__).resolve().parent.parent / "README.md"),
                   help="the Markdown file to update (default: the checkout's README.md)")
    p.add_argument("--marker", default=DEFAULT_MARKER,
                   help="the table follows the line <!-- MARKER --> (default %(default)s)")
    p.add_argument("--filter", metavar="TEXT", default=None,
                   help="only configurations whose name contains TEXT (comma-separated: any)")
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 and show the difference if the table is not "
                        "what the JSON lines give")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        sys.stdout.reconfigure(errors="replace")
    except (AttributeError, ValueError):
        pass
    try:
        header, records = load_records(args.json, args.filter)
        with open(args.readme, encoding="utf-8", newline="") as f:
            text = f.read()
        new = update_text(text, records, args.marker)
    except (OSError, ReportError) as exc:
        print(f"bench_report: {exc}", file=sys.stderr)
        return 2
    if new == text:
        print(f"{args.readme}: the table after <!-- {args.marker} --> is up to date "
              f"({len(records)} rows)")
        return 0
    if args.check:
        diff = difflib.unified_diff(text.splitlines(keepends=True), new.splitlines(keepends=True),
                                    args.readme, f"{args.readme} (from {args.json})")
        sys.stdout.writelines(diff)
        print(f"{args.readme}: the table differs from {args.json}; run without --check to "
              "rewrite it")
        return 1
    tmp = f"{args.readme}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(new)
    os.replace(tmp, args.readme)
    print(f"{args.readme}: table after <!-- {args.marker} --> rewritten ({len(records)} rows)")
    if header is not None:
        print("The run's environment, for the text around the table:")
        for line in bench.format_env(header)[1:]:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
