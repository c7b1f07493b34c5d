"""Decode-kernel configuration sweep: times (tile rows, stages, CTAs per SM) choices per shape.

Not a benchmark of the public path (see ``python -m mla_cupy.bench``): it drives the portable
family's launch directly (``_portable.DecodeLaunch`` with a configuration of its own making) so
configurations the selector would not pick can be compared in one run.
Usage (repo root, GPU machine): PYTHONPATH=. python3 scripts/tune.py
"""
import sys

import cupy

from mla_cupy import _interop, _launch, _metadata, _portable, _select, _validate
from mla_cupy.scheduler import num_sm_parts

D, DV, PAGE = 576, 512, 64


def make(b, s_q, h_q, sk, n_caches):
    nb = b * sk // PAGE
    caches = []
    for _ in range(n_caches):
        kc = (cupy.random.standard_normal((nb, PAGE, 1, D), dtype=cupy.float32) * 0.1).astype(cupy.float16)
        bt = cupy.random.permutation(nb).astype(cupy.int32).reshape(b, -1)
        caches.append((kc, bt))
    q = (cupy.random.standard_normal((b, s_q, h_q, D), dtype=cupy.float32) * 0.1).astype(cupy.float16)
    sl = cupy.full((b,), sk, dtype=cupy.int32)
    return q, caches, sl


def time_cfg(q, caches, sl, cfg, parts, iters=30):
    _, ctx = _interop.import_arrays({"q": q, "cache_seqlens": sl})
    with ctx.activate():
        sched, ns = _metadata.run(ctx.device_id, ctx.stream, sl, parts)
    runs = []
    for kc, bt in caches:
        a = {"q": q, "k_cache": kc, "block_table": bt, "cache_seqlens": sl, "tile_scheduler_metadata": sched,
             "num_splits": ns, "out": None, "lse": None}
        pb = _validate.check_decode_args(q, kc, bt, sl, DV, sched, ns, None, True, False, None, None, None)
        launch = _portable.DecodeLaunch(ctx.device_id, a, pb, cfg)
        rows, cols = launch.workspace
        bufs = (cupy.empty((pb.batch, pb.s_q, pb.h_q, DV), dtype=q.dtype), cupy.empty((pb.batch, pb.h_q, pb.s_q),
                dtype=cupy.float32), cupy.empty((rows, cols), dtype=cupy.float32), cupy.empty((rows,), dtype=cupy.float32))
        runs.append((a, launch, [b.data.ptr for b in bufs], bufs))

    def run(i):
        a, launch, ptrs, _ = runs[i % len(runs)]
        launch(ctx.stream, a, *ptrs)

    with ctx.activate():
        for i in range(len(runs)):  # warm-up / compile
            run(i)
    e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
    e0.record()
    for i in range(iters):
        run(i)
    e1.record()
    e1.synchronize()
    return cupy.cuda.get_elapsed_time(e0, e1) * 1e3 / iters


def main():
    dev = cupy.cuda.runtime.getDevice()
    cc, sms, smem, smem_sm = _launch.device_info(dev)
    print(f"sm_{cc}, {sms} SMs, {smem} B smem/block")
    shapes = [(128, 1, 16, 4096), (128, 1, 32, 4096), (128, 2, 16, 4096), (128, 1, 64, 4096)]
    print(f"{'shape':<22}{'m_tile':>7}{'stages':>7}{'cta/sm':>7}{'wn/mt/bn':>9}{'us':>9}{'TB/s':>7}{'TFLOP/s':>9}")
    for b, s_q, h_q, sk in shapes:
        q, caches, sl = make(b, s_q, h_q, sk, 2)
        m = s_q * h_q
        with _select.forced("portable"):
            default = _select.decode_choice(dev, "float16", D, DV, m, PAGE).config
        # The selector's layout of each tile, plus the 16-row-warp alternatives it replaced.
        layouts = {t: sorted({_portable.decode_layout(t), (4, 1, 32)}) for t in _portable.M_TILES}
        for m_tile in _portable.M_TILES:
            if m_tile < 64 and m > 64:
                continue
            for wn, mt, bn in layouts[m_tile]:
                for stages in (2, 3, 4):
                    smem_b = _portable.decode_smem_bytes(D, m_tile, stages, (wn, mt, bn))
                    if smem_b > smem:
                        continue
                    cfg = _portable.DecodeConfig(m_tile, stages, 32 * (m_tile // (16 * mt)) * wn, smem_b, 1, wn, mt, bn)
                    per_sm = max(1, min(4, smem_sm // (smem_b + _portable.SMEM_RESERVED_PER_CTA)))
                    for ctas in sorted({1, per_sm}):
                        parts = num_sm_parts(sms * ctas, m, 1)
                        try:
                            t = time_cfg(q, caches, sl, cfg, parts)
                        except Exception as exc:  # noqa: BLE001
                            print(f"b{b} s_q{s_q} h{h_q}: {cfg} x{ctas} failed: {exc}")
                            continue
                        tb = b * sk * D * 2 / t / 1e6
                        tf = b * s_q * h_q * sk * 2 * (D + DV) / t / 1e6
                        is_default = (cfg.m_tile, cfg.stages, ctas, wn, mt, bn) == (
                            default.m_tile, default.stages, default.ctas_per_sm, default.warps_n,
                            default.m_tiles_per_warp, default.kv_tile)
                        print(f"{f'b{b} s_q{s_q} h{h_q} s{sk}':<22}{m_tile:>7}{stages:>7}{ctas:>7}"
                              f"{f'{wn}/{mt}/{bn}':>9}{t:>9.1f}{tb:>7.2f}{tf:>9.1f}{' <- default' if is_default else ''}")
        del q, caches
        cupy.get_default_memory_pool().free_all_blocks()
    return 0


if __name__ == "__main__":
    sys.exit(main())
