// Combine kernel: merges the split partial results of each request into out and lse.
//
// Grid (b * ceil(m * DV / 128 / 4), h_kv); block 128 = kCombineWarps (4) warps. One warp merges one
// 128-column slice of one packed query row (slices, rows and requests share grid.x, whose
// limit is 2^31 - 1, so any batch and any s_q * h_q fit; splitting rows into slices keeps
// enough warps in flight when a small batch has many splits). Requests with a single split
// were written by the decode kernel and are skipped. Each lane owns 4 columns of the slice (one
// 16-byte load per split). The warp issues its first kCombineLoads (8) partial-output loads at
// once, beside the lse reads (they do not depend on them), and then keeps 8 in flight: with
// few splits (most split requests of a large batch have 2) the merge costs about one round trip
// to L2. The lse of the first 32 splits are read once (lane s holds split s's) and the weights
// 2^(lse_s - lse) pass to the other lanes by shuffle; further splits are read 32 at a time. A
// row no split saw anything of gets out = 0 and lse = +inf. Behind a decode that calls
// pdl_launch_dependents(), the combine may be launched early (programmatic dependent launch)
// and waits in pdl_wait().
#pragma once

namespace mla {

constexpr int kCombineWarps = 4;           // per CTA
constexpr int kCombineLoads = 8;           // partial-output loads a warp keeps in flight
constexpr int kCombineCtasPerSm = 8;       // register budget: 8 CTAs of 128 threads per SM
constexpr int kCombineSliceColumns = 128;  // columns of a row one warp merges, 4 per lane
static_assert(kCombineSliceColumns == 32 * 4, "a lane merges one float4 of the slice");
static_assert(32 % kCombineLoads == 0, "a batch of loads never straddles two 32-split chunks of weights");

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
  const int col = slice * kCombineSliceColumns + lane * 4;
  const float* o_col = p.o_accum + ((int64_t)base * p.h_kv + hk) * p.m * DV + (int64_t)row * DV + col;
  const int64_t o_split_stride = (int64_t)p.h_kv * p.m * DV;
  float4 v[kCombineLoads];
  auto load_batch = [&](int s0) {
#pragma unroll
    for (int u = 0; u < kCombineLoads; ++u)
      if (s0 + u < n) v[u] = *reinterpret_cast<const float4*>(o_col + (s0 + u) * o_split_stride);
  };
  load_batch(0);

  const float l0 = lane < n ? lse_row[lane * lse_split_stride] : neg_inf();
  float mx = l0;
  for (int s = lane + 32; s < n; s += 32) mx = fmaxf(mx, lse_row[s * lse_split_stride]);
  for (int off = 16; off >= 1; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float sum = 0.f;
  if (mx != neg_inf()) {
    sum = fast_exp2(l0 - mx);
    for (int s = lane + 32; s < n; s += 32) sum += fast_exp2(lse_row[s * lse_split_stride] - mx);
  }
  for (int off = 16; off >= 1; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const bool empty = !(sum > 0.f);
  const float lse2 = empty ? pos_inf() : mx + log2f(sum);

  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (!empty) {
    float w_lane = fast_exp2(l0 - lse2);  // weight of split (s0 & ~31) + lane; 0 past the splits
    for (int s0 = 0; s0 < n; s0 += kCombineLoads) {
      if (s0 > 0) {
        if ((s0 & 31) == 0)
          w_lane = fast_exp2((s0 + lane < n ? lse_row[(s0 + lane) * lse_split_stride] : neg_inf()) - lse2);
        load_batch(s0);
      }
#pragma unroll
      for (int u = 0; u < kCombineLoads; ++u) {
        const float w = __shfl_sync(0xffffffffu, w_lane, (s0 + u) & 31);
        if (s0 + u < n) {
          acc.x += w * v[u].x;
          acc.y += w * v[u].y;
          acc.z += w * v[u].z;
          acc.w += w * v[u].w;
        }
      }
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
__global__ void __launch_bounds__(32 * kCombineWarps, kCombineCtasPerSm) combine_kernel(const __grid_constant__ CombineParams p) {
  combine_body<DV, Elem>(p);
}

}  // namespace mla
