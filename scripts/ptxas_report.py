"""ptxas' resource report (registers, spills, shared memory) of each sm90 decode variant.

Usage: ``python scripts/ptxas_report.py [substring]``: compiles every sm90 decode variant whose
name holds the substring (all by default) for sm_90a, offline, and prints the report lines,
with any wgmma waits ptxas had to inject and any wgmma serialization it reports.
"""

import sys

from mla_cupy import _compile, _sm90


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    pick = argv[0] if argv else ""
    for variant in _sm90.all_variants():
        if pick not in variant.name:
            continue
        log = _compile.compile_offline(variant, "sm_90a").log
        keep = ("registers", "spill", "injected", "serialized")
        lines = [ln.strip() for ln in log.splitlines() if any(k in ln for k in keep)]
        print(variant.name)
        for ln in lines:
            print("   ", ln)
    return 0


if __name__ == "__main__":
    sys.exit(main())
