// Combine kernel: merges the split partial results of each request into out and lse.
//
// Grid (b * ceil(m / 8), h_kv); block 256 = 8 warps, one packed query row per warp (rows and
// requests share grid.x, whose limit is 2^31 - 1, so any batch and any s_q * h_q fit).
// Requests with a single split were written by the decode kernel and are skipped. For a split
// request the warp reads the log2-domain lse of every split, forms the merged lse and the
// weights 2^(lse_i - lse), and sums the normalised partial outputs (each lane owns 4-column
// groups, 16-byte loads). A row no split saw anything of gets out = 0 and lse = +inf.
#pragma once

namespace mla {

template <int DV, bool IsBf16>
__global__ void __launch_bounds__(256) combine_kernel(const __grid_constant__ CombineParams p) {
  static_assert(DV % 128 == 0, "each lane owns DV / 128 groups of 4 columns");
  const int row_blocks = (p.m + 7) / 8;
  const int req = blockIdx.x / row_blocks, hk = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int row = (blockIdx.x % row_blocks) * 8 + (threadIdx.x >> 5);
  const int base = p.num_splits[req];
  const int n = p.num_splits[req + 1] - base;
  if (n <= 1 || row >= p.m) return;

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

  constexpr int GROUPS = DV / 128;  // 4-column groups per lane
  float4 acc[GROUPS];
#pragma unroll
  for (int k = 0; k < GROUPS; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (!empty) {
    const float* o_row = p.o_accum + ((int64_t)base * p.h_kv + hk) * p.m * DV + (int64_t)row * DV;
    const int64_t o_split_stride = (int64_t)p.h_kv * p.m * DV;
    for (int s = 0; s < n; ++s) {
      const float w = fast_exp2(lse_row[s * lse_split_stride] - lse2);
#pragma unroll
      for (int k = 0; k < GROUPS; ++k) {
        const float4 v = *reinterpret_cast<const float4*>(o_row + s * o_split_stride + k * 128 + lane * 4);
        acc[k].x += w * v.x;
        acc[k].y += w * v.y;
        acc[k].z += w * v.z;
        acc[k].w += w * v.w;
      }
    }
  }

  const int i = row / p.ngroups, head = hk * p.ngroups + row % p.ngroups;
  char* orow = static_cast<char*>(p.out) + 2 * (req * p.o_stride_b + i * p.o_stride_s + (int64_t)head * p.o_stride_h);
#pragma unroll
  for (int k = 0; k < GROUPS; ++k) {
    uint2 packed;
    packed.x = pack2<IsBf16>(acc[k].x, acc[k].y);
    packed.y = pack2<IsBf16>(acc[k].z, acc[k].w);
    *reinterpret_cast<uint2*>(orow + 2 * (k * 128 + lane * 4)) = packed;
  }
  if (lane == 0) {
    p.lse[req * p.lse_stride_b + head * p.lse_stride_h + i * p.lse_stride_s] = empty ? pos_inf() : lse2 * kLn2;
  }
}

}  // namespace mla
