// Parameter blocks passed by value (as `__grid_constant__ const`) to every kernel.
// mla_cupy/_params.py mirrors each struct as a NumPy structured dtype. Every translation unit
// static_asserts the sizes; the compile test lane checks every field offset (NVRTC has no
// offsetof: a probe kernel's PTX stores each offset as a literal), so the two cannot drift.
#pragma once

namespace mla {

// Tile-scheduler metadata (scheduler.cuh writes it, the decode kernels read it): one row of
// kSchedMetadataSize int32 per part, positions counted in blocks of kSchedBlockTokens tokens.
// support.py mirrors both; each translation unit asserts they agree.
constexpr int kSchedBlockTokens = 64;
constexpr int kSchedMetadataSize = 8;

// One decode call: q [b, s_q, h_q, d], k_cache [num_blocks, page, h_kv, d] (V = first dv columns),
// out [b, s_q, h_q, dv], lse [b, h_q, s_q]. Strides are in elements. The m = s_q * ngroups query
// rows that share one kv head are packed row = i * ngroups + g (query token i, head g of the group).
struct DecodeParams {
  const void* q;
  const void* kv;
  const int32_t* block_table;
  const int32_t* seqlens;
  const int32_t* sched;       // [num_sm_parts, 8] tile-scheduler metadata
  const int32_t* num_splits;  // [b + 1] prefix sums of splits per request
  void* out;
  float* lse;
  float* o_accum;    // [b + num_sm_parts, h_kv, m, dv] partial outputs (normalised) of split requests
  float* lse_accum;  // [b + num_sm_parts, h_kv, m] their log2-domain lse
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t kv_stride_block, kv_stride_tok, kv_stride_head;
  int64_t bt_stride_b;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t lse_stride_b, lse_stride_h, lse_stride_s;
  int32_t batch, s_q, h_q, h_kv;
  int32_t ngroups, m, page_size, causal;
  float scale_log2;  // softmax_scale * log2(e)
  int32_t pad0;
};

// Merge of the split partial results of each request into out / lse.
struct CombineParams {
  const int32_t* num_splits;
  const float* o_accum;
  const float* lse_accum;
  void* out;
  float* lse;
  int64_t o_stride_b, o_stride_s, o_stride_h;
  int64_t lse_stride_b, lse_stride_h, lse_stride_s;
  int32_t batch, h_kv, ngroups, m;
};

// Tile-scheduler metadata for one batch (see scheduler.cuh).
struct MetadataParams {
  const int32_t* seqlens;
  int32_t* sched;
  int32_t* num_splits;
  int32_t batch, num_sm_parts, block_tokens, fixed_overhead;
};

}  // namespace mla
