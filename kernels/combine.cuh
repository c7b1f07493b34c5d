// Combine kernel: merges the split partial results of each request into out and lse.
//
// Grid (b * ceil(m * DV / 128 / 8), h_kv); block 256 = kCombineWarps (8) warps. One warp merges one
// 128-column slice of one packed query row (slices, rows and requests share grid.x, whose
// limit is 2^31 - 1, so any batch and any s_q * h_q fit; splitting rows into slices keeps
// enough warps in flight when a small batch has many splits). Requests with a single split
// were written by the decode kernel and are skipped. The warp reads the log2-domain lse of
// every split, forms the merged lse and the weights 2^(lse_i - lse), and sums the normalised
// partial outputs (each lane owns 4 columns: one 16-byte load per split). A row no split saw
// anything of gets out = 0 and lse = +inf. Behind a decode that calls pdl_launch_dependents(),
// the combine may be launched early (programmatic dependent launch) and waits in pdl_wait().
#pragma once

namespace mla {

constexpr int kCombineWarps = 8;           // per CTA
constexpr int kCombineSliceColumns = 128;  // columns of a row one warp merges, 4 per lane
static_assert(kCombineSliceColumns == 32 * 4, "a lane merges one float4 of the slice");

// The kernel body, shared by combine_kernel and the flat-argument entry of jax_entry.cuh.
// AllSplit: the decode wrote every request to o_accum / lse_accum (decode_body<..., true>), so
// requests with a single split are merged (copied) here too.
template <int DV, class Elem, bool AllSplit = false>
MLA_DEVICE void combine_body(const CombineParams& p) {
  static_assert(DV % kCombineSliceColumns == 0, "a row is made of whole slices");
  constexpr int SLICES = DV / kCombineSliceColumns;
  const int unit_blocks = (p.m * SLICES + kCombineWarps - 1) / kCombineWarps;
  const int req = blockIdx.x / unit_blocks, hk = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int unit = (blockIdx.x % unit_blocks) * kCombineWarps + (threadIdx.x >> 5);
  const int row = unit / SLICES, slice = unit % SLICES;
  const int base = p.num_splits[req];
  const int n = p.num_splits[req + 1] - base;
  if (n < (AllSplit ? 1 : 2) || row >= p.m) return;
  // Launched behind the decode with programmatic serialization on sm_90: the schedule above was
  // written before the decode started; the partial results are not ready before this.
  pdl_wait();

  const float* lse_row = p.lse_accum + (int64_t)base * p.h_kv * p.m + (int64_t)hk * p.m + row;
  const int64_t lse_split_stride = (int64_t)p.h_kv * p.m;
  float mx = neg_inf();
  for (int s = lane; s < n; s += 32) mx = fmaxf(mx, lse_row[s * lse_split_stride]);
  for (int off = 16; off >= 1; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float sum = 0.f;
  if (mx != neg_inf()) {
    for (int s = lane; s < n; s += 32) sum += fast_exp2(lse_row[s * lse_split_stride] - mx);
  }
  for (int off = 16; off >= 1; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const bool empty = !(sum > 0.f);
  const float lse2 = empty ? pos_inf() : mx + log2f(sum);

  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  const int col = slice * kCombineSliceColumns + lane * 4;
  if (!empty) {
    const float* o_col = p.o_accum + ((int64_t)base * p.h_kv + hk) * p.m * DV + (int64_t)row * DV + col;
    const int64_t o_split_stride = (int64_t)p.h_kv * p.m * DV;
#pragma unroll 4
    for (int s = 0; s < n; ++s) {
      const float w = fast_exp2(lse_row[s * lse_split_stride] - lse2);
      const float4 v = *reinterpret_cast<const float4*>(o_col + s * o_split_stride);
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
  }

  const int i = row / p.ngroups, head = hk * p.ngroups + row % p.ngroups;
  char* orow = static_cast<char*>(p.out) + 2 * (req * p.o_stride_b + i * p.o_stride_s + (int64_t)head * p.o_stride_h);
  uint2 packed;
  packed.x = pack2<Elem::kIsBf16>(acc.x, acc.y);
  packed.y = pack2<Elem::kIsBf16>(acc.z, acc.w);
  *reinterpret_cast<uint2*>(orow + 2 * col) = packed;
  if (lane == 0 && slice == 0) {
    p.lse[req * p.lse_stride_b + head * p.lse_stride_h + i * p.lse_stride_s] = empty ? pos_inf() : lse2 * kLn2;
  }
}

template <int DV, class Elem>
__global__ void __launch_bounds__(32 * kCombineWarps) combine_kernel(const __grid_constant__ CombineParams p) {
  combine_body<DV, Elem>(p);
}

}  // namespace mla
