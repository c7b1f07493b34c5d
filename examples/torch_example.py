"""mla_cupy from PyTorch: torch tensors in, torch tensors out, on torch's current stream.

The inputs are made with torch on the GPU (two query tokens per request, as in speculative
decoding, 64 query heads, bfloat16) and handed over as they are: mla_cupy reads them through
DLPack without a copy, runs on torch's current CUDA stream (here a side stream) and returns
torch tensors. The result is compared with the NumPy float64 reference.

    python examples/torch_example.py
"""

import sys


def main():
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed; nothing to run.")
        return 0
    if not torch.cuda.is_available():
        print("No CUDA GPU visible to PyTorch; nothing to run.")
        return 0

    from mla_cupy import flash_mla_with_kvcache, get_mla_metadata
    from mla_cupy.reference import flash_mla_with_kvcache_reference
    from mla_cupy.testing import assert_mla_close

    b, s_q, h_q, h_kv, d, dv, page = 8, 2, 64, 1, 576, 512, 64
    max_seqlen = 2048
    dev = torch.device("cuda")
    blocks_per_seq = max_seqlen // page
    num_blocks = b * blocks_per_seq

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        cache_seqlens = torch.randint(s_q, max_seqlen + 1, (b,), dtype=torch.int32, device=dev)
        block_table = torch.randperm(num_blocks, dtype=torch.int32, device=dev)
        block_table = block_table.view(b, blocks_per_seq)
        q = (torch.randn(b, s_q, h_q, d, device=dev) * 0.1).to(torch.bfloat16)
        k_cache = (torch.randn(num_blocks, page, h_kv, d, device=dev) * 0.1).to(torch.bfloat16)

        # Enqueued on `side`, after the kernels that made the inputs.
        tile_scheduler_metadata, num_splits = get_mla_metadata(
            cache_seqlens, s_q * h_q // h_kv, h_kv)
        out, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, dv,
                                          tile_scheduler_metadata, num_splits, causal=True)
        # Ordinary torch code can use the results on the same stream right away.
        out_norm = out.float().norm()
    side.synchronize()

    if not (isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)):
        raise TypeError(f"expected torch tensors back, got {type(out)} and {type(lse)}")
    if out.device != q.device or out.dtype != q.dtype or lse.dtype != torch.float32:
        raise TypeError(f"unexpected result: out {out.dtype} on {out.device}, lse {lse.dtype}")

    out_ref, lse_ref = flash_mla_with_kvcache_reference(
        q.float().cpu().numpy(), k_cache.float().cpu().numpy(), block_table.cpu().numpy(),
        cache_seqlens.cpu().numpy(), dv, causal=True)
    report = assert_mla_close(out.float().cpu().numpy(), lse.cpu().numpy(), out_ref, lse_ref,
                              std=0.1, msg="torch example")
    print(f"OK with torch {torch.__version__}: out {tuple(out.shape)} {out.dtype}, lse "
          f"{tuple(lse.shape)} {lse.dtype} on {out.device}, |out| {out_norm.item():.3f}; "
          f"vs float64 reference: out max |error| {report.out_max_abs_error:.2e}, "
          f"lse max |error| {report.lse_max_abs_error:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
