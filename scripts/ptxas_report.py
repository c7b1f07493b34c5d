"""ptxas' resource report (registers, spills, shared memory) of each sm90 decode variant.

Usage: ``python scripts/ptxas_report.py [--kernels DIR] [substring]``: compiles every sm90
decode variant whose name holds the substring (all by default) for sm_90a, offline, and prints
the report lines, with any wgmma waits ptxas had to inject and any wgmma serialization it
reports. ``--kernels DIR`` takes the kernel sources from DIR (as ``scripts/ab_kernels.py``
does) instead of the package's: the way to check a kernel version kept in another folder (an
editable install finds the checkout's own ``kernels/`` whatever the working directory).
"""

import sys

from mla_cupy import _compile, _sm90


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--kernels"]:
        import pathlib

        from ab_kernels import use_kernel_folder

        use_kernel_folder(pathlib.Path(argv[1]).resolve())
        argv = argv[2:]
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
