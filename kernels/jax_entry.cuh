// Flat-argument entry points (experimental JAX route, mla_cupy/jax.py).
//
// The kernels above take one parameter block by value. The launcher the JAX route goes through
// (jaxlib's GPU kernel-call custom call) passes a flat list instead: the device pointer of each
// custom-call operand and result, in order, then scalars, one kernel argument each. Each entry
// below takes exactly the fields of its parameter block as separate arguments, in the struct's
// order and without the pad fields (mla_cupy/jax.py builds the argument list from the NumPy
// mirror of the struct in _params.py; the compile lane checks the PTX signature against it),
// fills the block and runs the same kernel body as the block-taking kernel, with the same
// launch bounds, grid, block and shared memory. (The launcher follows Triton's calling
// convention and passes two more pointers after the last argument, a scratch and a profiling
// buffer; the driver reads as many arguments as the entry declares, so they go unread here.)
//
// Needs scheduler.cuh, combine.cuh and decode_sm80.cuh before it (the portable family only:
// the Hopper kernel takes a TMA descriptor the flat launcher cannot build).
#pragma once

namespace mla {

// custom call: cache_seqlens -> (tile_scheduler_metadata, num_splits). Grid (1), block (32).
__global__ void __launch_bounds__(kMetadataThreads)
    metadata_flat_kernel(const int32_t* seqlens, int32_t* sched, int32_t* num_splits, int32_t batch,
                         int32_t num_sm_parts, int32_t block_tokens, int32_t fixed_overhead) {
  MetadataParams p;
  p.seqlens = seqlens;
  p.sched = sched;
  p.num_splits = num_splits;
  p.batch = batch;
  p.num_sm_parts = num_sm_parts;
  p.block_tokens = block_tokens;
  p.fixed_overhead = fixed_overhead;
  metadata_body(p);
}

// custom call: (q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits)
// -> (o_accum, lse_accum); out and lse are passed as null and not written: every request goes to
// the workspace (decode_body<..., AllSplit = true>) and the combine writes all of out and lse, so
// no buffer is both an operand and a result. Grid and block of decode_kernel.
template <int D, int DV, int M_TILE, int STAGES, int WN, int MT, int BN, class Elem>
__global__ void __launch_bounds__(DecodeTraits<D, DV, M_TILE, STAGES, WN, MT, BN>::NTHREADS, 1)
    decode_flat_kernel(const void* q, const void* kv, const int32_t* block_table, const int32_t* seqlens,
                       const int32_t* sched, const int32_t* num_splits, void* out, float* lse, float* o_accum,
                       float* lse_accum, int64_t q_stride_b, int64_t q_stride_s, int64_t q_stride_h,
                       int64_t kv_stride_block, int64_t kv_stride_tok, int64_t kv_stride_head, int64_t bt_stride_b,
                       int64_t o_stride_b, int64_t o_stride_s, int64_t o_stride_h, int64_t lse_stride_b,
                       int64_t lse_stride_h, int64_t lse_stride_s, int32_t batch, int32_t s_q, int32_t h_q,
                       int32_t h_kv, int32_t ngroups, int32_t m, int32_t page_size, int32_t causal,
                       float scale_log2) {
  DecodeParams p;
  p.q = q;
  p.kv = kv;
  p.block_table = block_table;
  p.seqlens = seqlens;
  p.sched = sched;
  p.num_splits = num_splits;
  p.out = out;
  p.lse = lse;
  p.o_accum = o_accum;
  p.lse_accum = lse_accum;
  p.q_stride_b = q_stride_b;
  p.q_stride_s = q_stride_s;
  p.q_stride_h = q_stride_h;
  p.kv_stride_block = kv_stride_block;
  p.kv_stride_tok = kv_stride_tok;
  p.kv_stride_head = kv_stride_head;
  p.bt_stride_b = bt_stride_b;
  p.o_stride_b = o_stride_b;
  p.o_stride_s = o_stride_s;
  p.o_stride_h = o_stride_h;
  p.lse_stride_b = lse_stride_b;
  p.lse_stride_h = lse_stride_h;
  p.lse_stride_s = lse_stride_s;
  p.batch = batch;
  p.s_q = s_q;
  p.h_q = h_q;
  p.h_kv = h_kv;
  p.ngroups = ngroups;
  p.m = m;
  p.page_size = page_size;
  p.causal = causal;
  p.scale_log2 = scale_log2;
  p.pad0 = 0;
  decode_body<D, DV, M_TILE, STAGES, WN, MT, BN, Elem, true>(p);
}

// custom call: (num_splits, o_accum, lse_accum) -> (out, lse): every row, single-split requests
// included (combine_body<..., AllSplit = true>). Grid and block of combine_kernel; a register
// budget of 6 CTAs per SM, not 8 (its scalar arguments take registers: at 8, sm_80 spilled).
template <int DV, class Elem>
__global__ void __launch_bounds__(32 * kCombineWarps, 6)
    combine_flat_kernel(const int32_t* num_splits, const float* o_accum, const float* lse_accum, void* out,
                        float* lse, int64_t o_stride_b, int64_t o_stride_s, int64_t o_stride_h,
                        int64_t lse_stride_b, int64_t lse_stride_h, int64_t lse_stride_s, int32_t batch,
                        int32_t h_kv, int32_t ngroups, int32_t m) {
  CombineParams p;
  p.num_splits = num_splits;
  p.o_accum = o_accum;
  p.lse_accum = lse_accum;
  p.out = out;
  p.lse = lse;
  p.o_stride_b = o_stride_b;
  p.o_stride_s = o_stride_s;
  p.o_stride_h = o_stride_h;
  p.lse_stride_b = lse_stride_b;
  p.lse_stride_h = lse_stride_h;
  p.lse_stride_s = lse_stride_s;
  p.batch = batch;
  p.h_kv = h_kv;
  p.ngroups = ngroups;
  p.m = m;
  combine_body<DV, Elem, true>(p);
}

}  // namespace mla
