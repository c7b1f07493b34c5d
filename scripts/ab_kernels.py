"""The benchmark with the kernel sources taken from another folder: A/B runs of kernel versions.

Usage: ``python scripts/ab_kernels.py DIR [benchmark options]``. DIR holds a full set of kernel
sources (e.g. ``git show REV:kernels/decode_sm90.cuh`` beside copies of the others); the
compile cache keys on the source hash, so versions never share a binary. Run it once per
version, one after the other on the same machine, and compare each version's ratio to the peers, which the
benchmark times in the same process. ``AB_SM90_PARTS_PER_SM=N`` makes the sm90 family ask the
scheduler for N parts per SM (more parts than resident CTAs: the hardware hands the later ones
to whichever SM frees first). ``AB_SM90_TRANSPOSED_ROWS=16,32`` sets the query-row counts that
take the sm90 transposed form (``_sm90.TRANSPOSED_ROWS``; empty: the pair form only), for kernel
versions whose transposed form covers other counts.
"""

import pathlib
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not pathlib.Path(argv[0]).is_dir():
        print(__doc__.strip(), file=sys.stderr)
        return 2
    folder = pathlib.Path(argv[0]).resolve()
    import dataclasses
    import os

    from mla_cupy import _sm90, bench

    parts = int(os.environ.get("AB_SM90_PARTS_PER_SM", "0"))
    if parts:
        supports = _sm90.supports
        _sm90.supports = lambda device, problem: (
            None if (c := supports(device, problem)) is None else dataclasses.replace(c, ctas_per_sm=parts))
        print(f"sm90 parts per SM: {parts}")

    rows = os.environ.get("AB_SM90_TRANSPOSED_ROWS")
    if rows is not None:
        _sm90.TRANSPOSED_ROWS = tuple(int(r) for r in rows.split(",") if r.strip())
        print(f"sm90 transposed form for at most {_sm90.TRANSPOSED_ROWS} query rows")

    use_kernel_folder(folder)
    print(f"kernel sources: {folder}")
    return bench.main(argv[1:])


def use_kernel_folder(folder):
    """Make this process build its kernels from the sources in `folder` (a pathlib.Path)."""
    from mla_cupy import _compile

    _compile._kernels_dir = lambda: folder
    for cached in (_compile.kernel_files, _compile._source_text, _compile.source_digest,
                   _compile.translation_unit):
        cached.cache_clear()


if __name__ == "__main__":
    sys.exit(main())
