// Portable split-KV MLA decode kernel: mma.sync (m16n8k16) tensor cores, cp.async multi-stage
// KV pipeline, online softmax. Runs on every GPU of compute capability 8.0 and newer.
//
// Grid (ceil(m / M_TILE), h_kv, num_sm_parts); block NTHREADS = 32 * WM * WN.
// One CTA takes part blockIdx.z of the tile-scheduler metadata and, for kv head blockIdx.y,
// computes query rows [blockIdx.x * M_TILE, +M_TILE) of every request (or request slice) that
// part owns: S = Q K^T over BN-token KV tiles, masked (sequence end, causal), online softmax,
// O += P V. A request owned whole is written to out / lse; a slice goes to the fp32 partial
// buffers o_accum / lse_accum for the combine kernel.
//
// Warp layout: each warp owns MT 16-row mma tiles (16 * MT query rows); WM = M_TILE / (16 * MT)
// warps cover the tile's rows and WN warps share each row group. The WN warps of a group split
// the BN tokens of S (TPW each) and the DV columns of O (CPW each); their row maxima and sums
// meet in shared memory, and P (16-bit) is exchanged through sP. Owning two m-tiles lets a warp
// reuse every K and V fragment it loads twice, which is what bounds the 64-row tile: the kernel
// is limited by shared-memory reads (ldmatrix), not by the tensor cores.
//
// Shared memory: sQ [M_TILE][D] and STAGES KV tiles [BN][D], all rows made of 16-byte chunks
// swizzled within 128-byte groups (chunk ^ (row & 7)) so ldmatrix is conflict-free; sP
// [M_TILE][BN + 8]; row statistics sMax / sSum [WN][M_TILE] (fp32).
#pragma once

namespace mla {

template <int D_, int DV_, int M_TILE_, int STAGES_, int WN_, int MT_, int BN_>
struct DecodeTraits {
  static constexpr int D = D_, DV = DV_, M_TILE = M_TILE_, STAGES = STAGES_;
  static constexpr int BN = BN_;                      // KV tokens per pipeline stage
  static constexpr int MT = MT_;                      // 16-row mma tiles per warp
  static constexpr int WM = M_TILE / (16 * MT);       // warps along query rows
  static constexpr int WN = WN_;                      // warps sharing a row group
  static constexpr int NWARPS = WM * WN;
  static constexpr int NTHREADS = 32 * NWARPS;
  static constexpr int TPW = BN / WN;                 // S tokens per warp
  static constexpr int NT_S = TPW / 8;                // n8 tiles of S per warp
  static constexpr int KSPLIT = MT * NT_S >= 4 ? 1 : 4 / (MT * NT_S);  // S accumulator chains: >= 4 in all
  static constexpr int PV_UNROLL = MT == 1 ? BN / 16 : 1;  // P V k-steps unrolled (registers allowing)
  static constexpr int CPW = DV / WN;                 // O columns per warp
  static constexpr int NT_O = CPW / 8;                // n8 tiles of O per warp
  static constexpr int CHUNKS = D / 8;                // 16-byte chunks per K/Q row
  static constexpr int P_STRIDE = BN + 8;             // sP row stride (elements), padded
  static constexpr int THREADS_PER_TOKEN = NTHREADS / BN;
  static constexpr int LOADS_PER_THREAD = (CHUNKS + THREADS_PER_TOKEN - 1) / THREADS_PER_TOKEN;
  static constexpr int Q_BYTES = M_TILE * D * 2;
  static constexpr int KV_STAGE_BYTES = BN * D * 2;
  static constexpr int P_BYTES = M_TILE * P_STRIDE * 2;
  static constexpr int STAT_BYTES = 2 * WN * M_TILE * 4;
  static constexpr int SMEM_BYTES = Q_BYTES + STAGES * KV_STAGE_BYTES + P_BYTES + STAT_BYTES;

  static_assert(M_TILE % (16 * MT) == 0 && M_TILE <= 64, "M_TILE is a multiple of the warp's rows");
  static_assert(MT == 1 || MT == 2, "a warp owns one or two 16-row mma tiles");
  static_assert(STAGES >= 2, "the pipeline needs at least two stages");
  static_assert(D % 64 == 0, "swizzle works on groups of 8 chunks: D must be a multiple of 64");
  static_assert(DV <= D && DV % 8 == 0, "V is the first DV columns of K");
  static_assert(NT_S == 1 || NT_S == 2, "S tiles per warp are loaded with ldmatrix x2 or x4");
  static_assert(NT_O % 2 == 0, "O tiles are loaded in pairs by ldmatrix x4.trans");
  static_assert(NTHREADS % BN == 0, "KV load mapping: whole threads per token");
  static_assert(BN % 16 == 0 && kSchedBlockTokens % BN == 0, "P V takes 16 tokens per mma; tiles align to schedule blocks");
  static_assert((D / 16) % KSPLIT == 0, "k-steps split evenly over the S accumulators");
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][CHUNKS] tile.
template <int CHUNKS>
MLA_DEVICE uint32_t swz(int row, int chunk) {
  return uint32_t((row * CHUNKS + (chunk ^ (row & 7))) * 16);
}

// The kernel body, shared by decode_kernel (parameter block by value) and the flat-argument
// entry of jax_entry.cuh; inlined into both. AllSplit: every request's result goes to
// o_accum / lse_accum, a request with one split too (out and lse are not written; the flat
// entry's combine then writes every row).
template <int D, int DV, int M_TILE, int STAGES, int WN, int MT, int BN, class Elem, bool AllSplit = false>
MLA_DEVICE void decode_body(const DecodeParams& p) {
  using T = DecodeTraits<D, DV, M_TILE, STAGES, WN, MT, BN>;
  extern __shared__ __align__(128) uint8_t smem[];

  uint8_t* sQ = smem;
  uint8_t* sKV = smem + T::Q_BYTES;
  uint16_t* sP = reinterpret_cast<uint16_t*>(sKV + T::STAGES * T::KV_STAGE_BYTES);
  float* sMax = reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(sP) + T::P_BYTES);
  float* sSum = sMax + T::WN * M_TILE;
  const uint32_t sQ_addr = smem_addr(sQ), sKV_addr = smem_addr(sKV), sP_addr = smem_addr(sP);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rg = warp % T::WM, wn = warp / T::WM;  // row group, slot within the group
  const int g = lane >> 2, t4 = lane & 3;          // mma fragment coordinates
  const int m_block = blockIdx.x, hk = blockIdx.y, part = blockIdx.z;
  const int row0 = m_block * M_TILE;               // first packed query row of this CTA
  const int wrow = rg * 16 * MT;                   // warp's first row inside the tile

  const int32_t* sched = p.sched + part * kSchedMetadataSize;
  const int begin_req = sched[0], end_req = sched[1];
  const int begin_block = sched[2], end_block = sched[3], begin_split = sched[4];

  const char* q_base = static_cast<const char*>(p.q);
  const char* kv_base = static_cast<const char*>(p.kv);

  for (int req = begin_req; req <= end_req; ++req) {
    const int seqlen = p.seqlens[req];
    const int tok_begin = req == begin_req ? begin_block * kSchedBlockTokens : 0;
    int tok_end = req == end_req ? min(end_block * kSchedBlockTokens, seqlen) : seqlen;
    // Causal: the last row of this tile sees keys up to seqlen - s_q + i_max.
    const int i_max = (min(row0 + M_TILE, p.m) - 1) / p.ngroups;
    if (p.causal) tok_end = min(tok_end, seqlen - p.s_q + i_max + 1);
    const int n_tiles = tok_end > tok_begin ? (tok_end - tok_begin + BN - 1) / BN : 0;
    const int split_idx = req == begin_req ? begin_split : 0;
    const int split_base = p.num_splits[req];
    const bool whole = !AllSplit && p.num_splits[req + 1] - split_base == 1;

    // ---- issue Q (rows past m are zero-filled) -------------------------------------------------
    for (int idx = tid; idx < M_TILE * T::CHUNKS; idx += T::NTHREADS) {
      const int r = idx / T::CHUNKS, c = idx % T::CHUNKS;
      const int row = row0 + r;
      const bool valid = row < p.m;
      const int i = valid ? row / p.ngroups : 0, gh = valid ? row % p.ngroups : 0;
      const char* src = q_base + 2 * (req * p.q_stride_b + i * p.q_stride_s +
                                      (int64_t)(hk * p.ngroups + gh) * p.q_stride_h + c * 8);
      cp_async_16(sQ_addr + swz<T::CHUNKS>(r, c), valid ? src : q_base, valid ? 16 : 0);
    }

    // ---- KV tile loader: THREADS_PER_TOKEN threads per token, strided 16-byte chunks ---------
    const int ld_tok = tid / T::THREADS_PER_TOKEN, ld_sub = tid % T::THREADS_PER_TOKEN;
    const int32_t* bt_row = p.block_table + req * p.bt_stride_b;
    // The block-table lookup of a tile is issued one iteration before its copies, so the
    // dependent global load never stalls the warp in front of the math.
    auto tile_src = [&](int tile) -> const char* {
      const int tok = tok_begin + tile * BN + ld_tok;
      if (tile >= n_tiles || tok >= tok_end) return nullptr;
      const int page = tok / p.page_size;
      const int64_t blk = bt_row[page];
      return kv_base + 2 * (blk * p.kv_stride_block + (int64_t)(tok - page * p.page_size) * p.kv_stride_tok +
                            (int64_t)hk * p.kv_stride_head);
    };
    auto issue_tile = [&](const char* src, int stage) {
      const uint32_t dst = sKV_addr + stage * T::KV_STAGE_BYTES;
#pragma unroll
      for (int j = 0; j < T::LOADS_PER_THREAD; ++j) {
        const int c = ld_sub + j * T::THREADS_PER_TOKEN;
        if (T::CHUNKS % T::THREADS_PER_TOKEN == 0 || c < T::CHUNKS)
          cp_async_16(dst + swz<T::CHUNKS>(ld_tok, c), src ? src + c * 16 : kv_base, src ? 16 : 0);
      }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < n_tiles) issue_tile(tile_src(s), s);
      cp_async_commit();  // the first group also carries Q
    }
    const char* next_src = tile_src(STAGES - 1);

    // ---- per-thread softmax state: rows wrow + mt * 16 + g + 8 * h, indexed r = 2 * mt + h ------
    float o[MT][T::NT_O][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < T::NT_O; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    float m_run[2 * MT], l_run[2 * MT];
    int vis_end[2 * MT];  // first invisible key of each of the thread's rows (causal)
#pragma unroll
    for (int r = 0; r < 2 * MT; ++r) {
      m_run[r] = neg_inf();
      l_run[r] = 0.f;
      const int row = row0 + wrow + (r >> 1) * 16 + g + 8 * (r & 1);
      vis_end[r] = p.causal ? seqlen - p.s_q + min(row, p.m - 1) / p.ngroups + 1 : seqlen;
    }

    for (int tile = 0; tile < n_tiles; ++tile) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // tile `tile` landed for everyone; stage of tile-1 is free
      {
        const int next = tile + STAGES - 1;
        if (next < n_tiles) issue_tile(next_src, next % STAGES);
        cp_async_commit();
        next_src = tile_src(next + 1);
      }
      const uint32_t sK = sKV_addr + (tile % STAGES) * T::KV_STAGE_BYTES;

      // ---- S = Q K^T for 16 * MT rows x TPW tokens ----------------------------------------------
      // KSPLIT independent accumulators break the serial dependence of consecutive k-steps.
      float s_part[T::KSPLIT][MT][T::NT_S][4];
#pragma unroll
      for (int u = 0; u < T::KSPLIT; ++u)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int j = 0; j < T::NT_S; ++j)
            s_part[u][mt][j][0] = s_part[u][mt][j][1] = s_part[u][mt][j][2] = s_part[u][mt][j][3] = 0.f;
      const int n0 = wn * T::TPW;
#pragma unroll 2
      for (int kb = 0; kb < D / 16; kb += T::KSPLIT) {
#pragma unroll
        for (int u = 0; u < T::KSPLIT; ++u) {
          const int kk = kb + u;
          uint32_t b[T::NT_S][2];
          if constexpr (T::NT_S == 2) {
            ldmatrix_x4(sK + swz<T::CHUNKS>(n0 + ((lane >> 4) << 3) + (lane & 7), kk * 2 + ((lane >> 3) & 1)),
                        b[0][0], b[0][1], b[1][0], b[1][1]);
          } else {
            ldmatrix_x2(sK + swz<T::CHUNKS>(n0 + (lane & 7), kk * 2 + ((lane >> 3) & 1)), b[0][0], b[0][1]);
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            uint32_t a[4];
            ldmatrix_x4(sQ_addr + swz<T::CHUNKS>(wrow + mt * 16 + (lane & 15), kk * 2 + (lane >> 4)), a[0], a[1],
                        a[2], a[3]);
#pragma unroll
            for (int j = 0; j < T::NT_S; ++j) mma_16816<Elem::kIsBf16>(s_part[u][mt][j], a, b[j]);
          }
        }
      }

      // ---- sum the chains, mask, scale to log2 units, tile row max ------------------------------
      const int tile_tok = tok_begin + tile * BN + n0;
      float s[MT][T::NT_S][4], mx[2 * MT];
#pragma unroll
      for (int r = 0; r < 2 * MT; ++r) mx[r] = neg_inf();
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < T::NT_S; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float acc = s_part[0][mt][j][e];
#pragma unroll
            for (int u = 1; u < T::KSPLIT; ++u) acc += s_part[u][mt][j][e];
            const int r = 2 * mt + (e >> 1);
            const int tok = tile_tok + j * 8 + 2 * t4 + (e & 1);
            const bool ok = tok < tok_end && tok < vis_end[r];
            s[mt][j][e] = ok ? acc * p.scale_log2 : neg_inf();
            mx[r] = fmaxf(mx[r], s[mt][j][e]);
          }
#pragma unroll
      for (int r = 0; r < 2 * MT; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        if (t4 == 0) sMax[wn * M_TILE + wrow + (r >> 1) * 16 + g + 8 * (r & 1)] = mx[r];
      }
      named_barrier(1 + rg, 32 * WN);

      float m_new[2 * MT], m_use[2 * MT], alpha[2 * MT], rs[2 * MT];
#pragma unroll
      for (int r = 0; r < 2 * MT; ++r) {
        float mt_max = m_run[r];
#pragma unroll
        for (int w = 0; w < WN; ++w) mt_max = fmaxf(mt_max, sMax[w * M_TILE + wrow + (r >> 1) * 16 + g + 8 * (r & 1)]);
        m_new[r] = mt_max;
        m_use[r] = mt_max == neg_inf() ? 0.f : mt_max;  // a row with nothing visible yet stays at zero
        alpha[r] = fast_exp2(m_run[r] - m_use[r]);
        rs[r] = 0.f;
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < T::NT_S; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = 2 * mt + (e >> 1);
            s[mt][j][e] = fast_exp2(s[mt][j][e] - m_use[r]);
            rs[r] += s[mt][j][e];
          }
          const int col = n0 + j * 8 + 2 * t4;
          const int prow = wrow + mt * 16 + g;
          store_u32(sP + prow * T::P_STRIDE + col, pack2<Elem::kIsBf16>(s[mt][j][0], s[mt][j][1]));
          store_u32(sP + (prow + 8) * T::P_STRIDE + col, pack2<Elem::kIsBf16>(s[mt][j][2], s[mt][j][3]));
        }
#pragma unroll
      for (int r = 0; r < 2 * MT; ++r) {
        rs[r] += __shfl_xor_sync(0xffffffffu, rs[r], 1);
        rs[r] += __shfl_xor_sync(0xffffffffu, rs[r], 2);
        if (t4 == 0) sSum[wn * M_TILE + wrow + (r >> 1) * 16 + g + 8 * (r & 1)] = rs[r];
      }
      // Rescale O only when some row's maximum moved (alpha is exactly 1 otherwise, and after
      // the first tiles it mostly is): the warp skips 4 * MT * NT_O multiplies.
      bool moved = false;
#pragma unroll
      for (int r = 0; r < 2 * MT; ++r) moved |= alpha[r] != 1.f;
      if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int j = 0; j < T::NT_O; ++j) {
            o[mt][j][0] *= alpha[2 * mt];
            o[mt][j][1] *= alpha[2 * mt];
            o[mt][j][2] *= alpha[2 * mt + 1];
            o[mt][j][3] *= alpha[2 * mt + 1];
          }
      }
      named_barrier(1 + rg, 32 * WN);
#pragma unroll
      for (int r = 0; r < 2 * MT; ++r) {
        float tsum = 0.f;
#pragma unroll
        for (int w = 0; w < WN; ++w) tsum += sSum[w * M_TILE + wrow + (r >> 1) * 16 + g + 8 * (r & 1)];
        l_run[r] = l_run[r] * alpha[r] + tsum;
        m_run[r] = m_new[r];
      }

      // ---- O += P V over this warp's CPW columns ------------------------------------------------
      const int c0 = wn * T::CPW;
#pragma unroll(T::PV_UNROLL)
      for (int kt = 0; kt < BN / 16; ++kt) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ldmatrix_x4(sP_addr + 2 * ((wrow + mt * 16 + (lane & 15)) * T::P_STRIDE + kt * 16 + (lane >> 4) * 8),
                      a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
        const int vtok = kt * 16 + (((lane >> 3) & 1) << 3) + (lane & 7);
#pragma unroll
        for (int j = 0; j < T::NT_O / 2; ++j) {
          uint32_t b[4];
          ldmatrix_x4_trans(sK + swz<T::CHUNKS>(vtok, ((c0 + j * 16) >> 3) + (lane >> 4)), b[0], b[1], b[2], b[3]);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816<Elem::kIsBf16>(o[mt][2 * j], a[mt], b);
            mma_16816<Elem::kIsBf16>(o[mt][2 * j + 1], a[mt], b + 2);
          }
        }
      }
    }
    cp_async_wait<0>();

    // ---- epilogue ---------------------------------------------------------------------------------
#pragma unroll
    for (int r = 0; r < 2 * MT; ++r) {
      const int mt = r >> 1, h = r & 1;
      const int row = row0 + wrow + mt * 16 + g + 8 * h;
      if (row >= p.m) continue;
      const float inv_l = l_run[r] > 0.f ? 1.f / l_run[r] : 0.f;
      const int i = row / p.ngroups, head = hk * p.ngroups + row % p.ngroups;
      if (whole) {
        char* orow = static_cast<char*>(p.out) +
                     2 * (req * p.o_stride_b + i * p.o_stride_s + (int64_t)head * p.o_stride_h);
#pragma unroll
        for (int j = 0; j < T::NT_O; ++j) {
          const int col = wn * T::CPW + j * 8 + 2 * t4;
          store_u32(orow + 2 * col, pack2<Elem::kIsBf16>(o[mt][j][2 * h] * inv_l, o[mt][j][2 * h + 1] * inv_l));
        }
        if (wn == 0 && t4 == 0) {
          p.lse[req * p.lse_stride_b + head * p.lse_stride_h + i * p.lse_stride_s] =
              l_run[r] > 0.f ? (m_run[r] + log2f(l_run[r])) * kLn2 : pos_inf();
        }
      } else {
        const int64_t slot = (int64_t)(split_base + split_idx) * p.h_kv + hk;
        float* orow = p.o_accum + (slot * p.m + row) * DV;
#pragma unroll
        for (int j = 0; j < T::NT_O; ++j) {
          const int col = wn * T::CPW + j * 8 + 2 * t4;
          *reinterpret_cast<float2*>(orow + col) = make_float2(o[mt][j][2 * h] * inv_l, o[mt][j][2 * h + 1] * inv_l);
        }
        if (wn == 0 && t4 == 0) {
          p.lse_accum[slot * p.m + row] = l_run[r] > 0.f ? m_run[r] + log2f(l_run[r]) : neg_inf();
        }
      }
    }
    __syncthreads();  // sQ / sKV / sP are reused by the next request
  }
}

template <int D, int DV, int M_TILE, int STAGES, int WN, int MT, int BN, class Elem>
__global__ void __launch_bounds__(DecodeTraits<D, DV, M_TILE, STAGES, WN, MT, BN>::NTHREADS, 1)
    decode_kernel(const __grid_constant__ DecodeParams p) {
  decode_body<D, DV, M_TILE, STAGES, WN, MT, BN, Elem>(p);
}

}  // namespace mla
