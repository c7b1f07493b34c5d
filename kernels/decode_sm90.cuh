// Hopper (sm_90a) split-KV decode: wgmma tensor cores, TMA loads, warp specialization.
//
// One CTA computes 64 packed query rows (row = i * ngroups + g: query token i, head g of the
// kv head's group; rows past m are zero) of one kv head against the KV range of one scheduler
// part: grid = (ceil(m / 64), h_kv, num_sm_parts), 384 threads, one CTA per SM.
//
//   warpgroup 0  producer: one warp looks up block-table entries and issues the TMA copies of
//                64-token KV tiles (CHUNKS column chunks of 64 x 64 elements, one mbarrier per
//                chunk so the math starts on the first chunk) into a two-stage ring. In the
//                pair form a stage frees up in two regions (chunks [0, V_CHUNKS), consumer 0's
//                V columns, and the rest), each loaded again as soon as its readers are done;
//                the transposed form frees it whole.
//   warpgroups 1, 2  consumers L and R, the pair form (consume_pairs): tiles go in pairs, L
//                computes S = Q K^T of the pair's first tile and R of its second (wgmma
//                m64n64k16 over the whole head dim, Q's last column chunk from registers),
//                the softmax references pass from L to R through shared memory, each publishes
//                its P to the other, and consumer c (L = 0, R = 1) accumulates
//                O[:, 256 c : 256 c + 256] += P V over
//                both tiles (wgmma m64n256k16, V read transposed from the K tile). L's softmax
//                overlaps R's Q K^T and R's softmax overlaps L's P V.
//   O (64 x 512 fp32) lives in registers split by columns over the two consumers.
//   With at most 16 query rows (NQ = 16, grid.x = 1) the consumers run the transposed form
//   instead (consume_transposed: S^T = K Q^T and O^T += V^T P^T, the tokens on the wgmma M side,
//   no padding of the rows to 64). It uses Q's first 16 rows, 4 KB of P (2 KB per consumer) and
//   a scratch for column statistics in Q's first chunk past row 16; the row statistics region
//   is unused.
//
// Shared memory (1024-byte aligned regions, 128-byte swizzle everywhere, matching TMA's
// SWIZZLE_128B and the wgmma descriptors): Q [CHUNKS][64 rows][128 B] (the pair form publishes
// R's P in its last chunk, held in registers), KV stages [2][CHUNKS][64 tokens][128 B], P
// [64 rows][128 B] (L's), row references and sums [2][64] fp32, then the mbarriers. The pair
// form stages each request's output in Q's region on its way to global memory. Tokens
// past a request's length (unloaded or NaN-poisoned cache slots) are masked out of S by
// selection and their V rows are zeroed before P V, so they never reach the output.
#pragma once

namespace mla {
namespace sm90 {

// The 128-byte CUtensorMap, passed by value as a __grid_constant__ parameter.
struct __align__(64) TmaDesc {
  uint64_t raw[16];
};

// ---- mbarriers, TMA, fences -----------------------------------------------------------------------
MLA_DEVICE void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
MLA_DEVICE void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
MLA_DEVICE void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
MLA_DEVICE bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
MLA_DEVICE void mbar_wait(uint32_t bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}
MLA_DEVICE void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// Orders this thread's ordinary shared-memory stores before later async-proxy reads (wgmma, TMA).
MLA_DEVICE void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// 4-D tiled TMA load (coordinates innermost first) completing on mbarrier `bar`. The KV cache is
// streamed (a tile is read by the few CTAs of one part at about the same time, then not again in
// the call), so its lines are marked evict-first in L2: they make room before anything else
// (measured: -3 % on variable-length batches, -7 % at b1 64K).
MLA_DEVICE uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// (`policy`: evict_first_policy(), made once: built per copy it cost the producer ~8 dependent
// uniform-datapath instructions on every chunk.)
MLA_DEVICE void tma_load_4d(uint32_t dst, const TmaDesc* map, uint32_t bar, int c0, int c1, int c2, int c3,
                            uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar), "l"(policy)
      : "memory");
}

template <int N>
MLA_DEVICE void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
MLA_DEVICE void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// ---- wgmma ------------------------------------------------------------------------------------------
// Shared-memory matrix descriptor, 128-byte swizzle. For K-major operands LBO is unused and SBO
// is the distance between 8-row groups; for MN-major (transposed) operands LBO is the distance
// between 64-element blocks along M/N and SBO the distance between 8-row groups along K.
// The start address sits in the low 14 bits (in 16-byte units) and shared memory is below 256 KB,
// so a descriptor moved by a multiple of 16 bytes is the descriptor plus bytes / 16 (no carry):
// the kernel builds each base once and adds constants.
MLA_DEVICE uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(lbo >> 4) << 16) | (uint64_t(sbo >> 4) << 32) | (1ull << 62);
}
MLA_DEVICE uint64_t desc_add(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

MLA_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
MLA_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
MLA_DEVICE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across wgmma issue/wait.
template <int N>
MLA_DEVICE void fence_regs(float* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// D[64 x N] (+)= A[64 x 16] B[16 x N]. _ss: A and B from shared memory (descriptors);
// _rs: A from registers; _tb: B transposed (MN-major). `accumulate` = 0 overwrites D.
template <int N, bool IsBf16>
MLA_DEVICE void wgmma_ss(float* d, uint64_t da, uint64_t db, int accumulate);
template <int N, bool IsBf16>
MLA_DEVICE void wgmma_ss_tb(float* d, uint64_t da, uint64_t db, int accumulate);
template <int N, bool IsBf16>
MLA_DEVICE void wgmma_rs_tb(float* d, const uint32_t* a, uint64_t db, int accumulate);
template <int N, bool IsBf16>
MLA_DEVICE void wgmma_rs(float* d, const uint32_t* a, uint64_t db, int accumulate);

// ---- wgmma instantiations (m64n256 SS and RS with B transposed: P V; bf16, fp16) ----
template <>
MLA_DEVICE void wgmma_ss_tb<256, true>(float* d, uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db), "r"(accumulate));
}

template <>
MLA_DEVICE void wgmma_rs_tb<256, true>(float* d, const uint32_t* a, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
}

template <>
MLA_DEVICE void wgmma_ss_tb<256, false>(float* d, uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db), "r"(accumulate));
}

template <>
MLA_DEVICE void wgmma_rs_tb<256, false>(float* d, const uint32_t* a, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
}

// ---- wgmma instantiations of the pair form (m64n64 SS and RS: S = Q K^T of a whole 64-token tile) ----
#define MLA_SM90_WGMMA_N64_SS(IS_BF16, TYPE)                                                           \
  template <>                                                                                        \
  MLA_DEVICE void wgmma_ss<64, IS_BF16>(float* d, uint64_t da, uint64_t db, int accumulate) {       \
    asm volatile(                                                                                    \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                 \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                              \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                        \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                                                                       \
        : "l"(da), "l"(db), "r"(accumulate));                                                        \
  }
#define MLA_SM90_WGMMA_N64_RS(IS_BF16, TYPE)                                                           \
  template <>                                                                                        \
  MLA_DEVICE void wgmma_rs<64, IS_BF16>(float* d, const uint32_t* a, uint64_t db, int accumulate) { \
    asm volatile(                                                                                    \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                 \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                              \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                          \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])                                                                                       \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));                    \
  }
MLA_SM90_WGMMA_N64_SS(true, "bf16")
MLA_SM90_WGMMA_N64_SS(false, "f16")
MLA_SM90_WGMMA_N64_RS(true, "bf16")
MLA_SM90_WGMMA_N64_RS(false, "f16")
#undef MLA_SM90_WGMMA_N64_SS
#undef MLA_SM90_WGMMA_N64_RS

// ---- wgmma instantiations of the transposed form (m64n16 SS, and SS with A transposed,
// MN-major): S^T = K Q^T and O^T += V^T P^T for at most 16 query rows ----
template <int N, bool IsBf16>
MLA_DEVICE void wgmma_ss_ta(float* d, uint64_t da, uint64_t db, int accumulate);

// One m64n16k16 SS instantiation: NAME<16, IS_BF16>, A transposed (MN-major) when TNSP_A is 1.
#define MLA_SM90_WGMMA_N16(NAME, IS_BF16, TYPE, TNSP_A)                                              \
  template <>                                                                                        \
  MLA_DEVICE void NAME<16, IS_BF16>(float* d, uint64_t da, uint64_t db, int accumulate) {            \
    asm volatile(                                                                                    \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"                                                 \
        "wgmma.mma_async.sync.aligned.m64n16k16.f32." TYPE "." TYPE " "                              \
        "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, " #TNSP_A ", 0;\n}\n"                   \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
        : "l"(da), "l"(db), "r"(accumulate));                                                        \
  }
MLA_SM90_WGMMA_N16(wgmma_ss, true, "bf16", 0)
MLA_SM90_WGMMA_N16(wgmma_ss, false, "f16", 0)
MLA_SM90_WGMMA_N16(wgmma_ss_ta, true, "bf16", 1)
MLA_SM90_WGMMA_N16(wgmma_ss_ta, false, "f16", 1)
#undef MLA_SM90_WGMMA_N16

// ---- the kernel -------------------------------------------------------------------------------------
// PAGE_BOX: tokens per TMA box, min(page_size, 64); a 64-token tile takes 64 / PAGE_BOX boxes
// per column chunk (one page each when pages are smaller than a tile).
template <int D, int DV, int PAGE_BOX>
struct DecodeTraits {
  static constexpr int BM = 64;                 // packed query rows per CTA
  static constexpr int BN = 64;                 // tokens per KV tile
  static constexpr int STAGES = 2;              // KV tiles in flight
  static constexpr int CHUNKS = D / 64;         // 64-column chunks of a K row (128 bytes each)
  static constexpr int HALF_DV = DV / 2;        // O columns per consumer warpgroup
  static constexpr int V_CHUNKS = HALF_DV / 64;  // V column chunks per consumer
  static constexpr int CHUNK_BYTES = BN * 128;
  static constexpr int Q_BYTES = CHUNKS * BM * 128;
  static constexpr int STAGE_BYTES = CHUNKS * CHUNK_BYTES;
  static constexpr int P_BYTES = BM * 128;
  static constexpr int STAT_BYTES = 2 * 2 * BM * 4;  // row references and row sums of both consumers
  // a full barrier per stage and chunk; two empty barriers per stage, one per region: chunks
  // [0, V_CHUNKS) (consumer 0's V columns) and the rest (consumer 1's V columns, and the RoPE
  // chunk at head dim 576)
  static constexpr int BAR_BYTES = (STAGES * CHUNKS + 2 * STAGES) * 8;
  static constexpr int ALIGN_SLACK = 1024;      // the dynamic window is aligned up to 1024 bytes
  static constexpr int SMEM_BYTES = ALIGN_SLACK + Q_BYTES + STAGES * STAGE_BYTES + P_BYTES + STAT_BYTES + BAR_BYTES;
  static constexpr int THREADS = 384;           // producer warpgroup + two consumer warpgroups
  static constexpr int BOXES = BN / PAGE_BOX;
  // Q's last Q_REG_CHUNKS column chunks are held in registers as wgmma A fragments (16 per
  // chunk): Q K^T then reads A from shared memory for the other chunks only, and the pair form
  // publishes consumer 1's P in the shared memory of the last one.
  static constexpr int Q_REG_CHUNKS = 1;
  static constexpr int Q_SMEM_CHUNKS = CHUNKS - Q_REG_CHUNKS;
  static constexpr int PRODUCER_REGS = 40;
  static constexpr int CONSUMER_REGS = 232;

  static_assert(D % 64 == 0 && DV <= D, "K rows are whole 64-column chunks; V is the first DV columns");
  static_assert(HALF_DV == 256, "each consumer owns 256 output columns (wgmma n256)");
  static_assert(PAGE_BOX >= 8 && BN % PAGE_BOX == 0, "TMA boxes of whole 8-row swizzle atoms");
  static_assert(PRODUCER_REGS * 128 + CONSUMER_REGS * 256 <= 65536, "register file");
};

// a if c else b, as a select instruction: NVVM may turn a C++ conditional on a value ptxas
// cannot prove uniform over the warpgroup into a branch, and a branch among wgmma accumulator
// accesses makes ptxas serialize every wgmma of the kernel (C7520).
MLA_DEVICE float select(bool c, float a, float b) {
  float r;
  asm("{\n.reg .pred q;\nsetp.ne.b32 q, %1, 0;\nselp.f32 %0, %2, %3, q;\n}\n" : "=f"(r) : "r"(int(c)), "f"(a), "f"(b));
  return r;
}

// Lanes with g = 2 k and 2 k + 1 (lane and lane ^ 4) hold, for fragment rows 2 k and 2 k + 1, the
// values v0 of column c and v1 of column c + 1. Returns the pair of rows (lo: row 2 k, hi: row
// 2 k + 1) of column c in the even lane and of column c + 1 in the odd one: one 32-bit store each.
MLA_DEVICE void pair_rows(float v0, float v1, bool odd, float& lo, float& hi) {
  const float other = __shfl_xor_sync(0xffffffffu, select(odd, v0, v1), 4);
  lo = select(odd, other, v0);
  hi = select(odd, v1, other);
}

// Q rows [row0, row0 + ROWS) of request `req` and kv head `hk` into sQ (CHUNKS chunks of
// [BM rows][128 B], 128-byte swizzle; rows past m read as zero) by the 256 consumer threads
// (`ctid`), with cp.async; returns once this thread's copies have landed and are visible to the
// async proxy (the caller's barrier then publishes them). UNROLL: the copy loop's unroll count
// (0: the compiler's choice).
template <int ROWS, int CHUNKS, int BM, int UNROLL>
MLA_DEVICE void load_q(const DecodeParams& p, uint32_t sQ, int req, int hk, int row0, int ctid) {
  const char* q_base = static_cast<const char*>(p.q);
  auto copy = [&](int idx) {
    const int r = idx / (CHUNKS * 8), c = (idx >> 3) % CHUNKS, j = idx & 7;
    const int row = row0 + r;
    const bool valid = row < p.m;
    const int i = valid ? row / p.ngroups : 0, gh = valid ? row % p.ngroups : 0;
    const char* src = q_base + 2 * (req * p.q_stride_b + i * p.q_stride_s +
                                    (int64_t)(hk * p.ngroups + gh) * p.q_stride_h + c * 64 + j * 8);
    cp_async_16(sQ + c * (BM * 128) + r * 128 + ((j ^ (r & 7)) << 4), valid ? src : q_base, valid ? 16 : 0);
  };
  if constexpr (UNROLL == 0) {
    for (int idx = ctid; idx < ROWS * CHUNKS * 8; idx += 256) copy(idx);
  } else {
#pragma unroll UNROLL
    for (int idx = ctid; idx < ROWS * CHUNKS * 8; idx += 256) copy(idx);
  }
  cp_async_commit();
  cp_async_wait<0>();
  fence_async_smem();
}

// ---- consumers of the transposed form (NQ = 16 query rows) ---------------------------------------
// The pair form (consume_pairs) pads the m packed query rows to a 64-row wgmma tile: with
// m <= 16, four times the matrix work. The transposed form puts the tile's 64 tokens on the M
// side: S^T = K Q^T (wgmma m64n16: A the K tile, B Q's 16 rows, both K-major) and
// O^T += V^T P^T (A the V columns read MN-major, B P^T from shared memory), without padding.
// Both consumers compute the whole S^T and its softmax (the same numbers, so nothing passes
// between them) and each accumulates its 256 output columns as 4 wgmma blocks of 64. The column
// maxima and sums of S^T run over the M side: over the 8 lanes of a fragment column with
// shuffles, then over the consumer's 4 warps through `scratch` (rows NQ.. of Q's first chunk,
// which no wgmma reads): per consumer 2 x 4 x NQ maxima (by tile parity) and 4 x NQ sums.
template <class Elem, int D, int DV, int PAGE_BOX, int NQ, class TokenRange>
MLA_DEVICE void consume_transposed(const DecodeParams& p, uint32_t sQ, uint32_t sKV, uint32_t sP, uint32_t bars,
                                   float* scratch, int begin_req, int end_req, int begin_split, int hk,
                                   TokenRange token_range) {
  using T = DecodeTraits<D, DV, PAGE_BOX>;
  constexpr bool kBf16 = Elem::kIsBf16;
  constexpr int NR = NQ / 2;     // accumulator registers of an m64nNQ fragment
  constexpr int SLOTS = NQ / 4;  // query columns per thread: n = 8 (s / 2) + 2 t4 + s % 2
  constexpr int OB = T::V_CHUNKS;  // 64-column blocks of O^T per consumer
  // 32 columns would also work (m64n32 S^T, a wgmma_ss_ta<32>), but measured 6 % slower than
  // the row form (the pair form's predecessor) at 32 rows.
  static_assert(NQ == 16, "transposed form: 16 query columns");
  static_assert(2 * 12 * NQ * 4 <= (T::BM - NQ) * 128, "scratch fits in Q's first chunk past row NQ");
  auto full_bar = [&](int stage, int c) { return bars + uint32_t(stage * T::CHUNKS + c) * 8u; };
  auto empty_bar = [&](int stage, int region) { return bars + uint32_t(T::STAGES * T::CHUNKS + 2 * stage + region) * 8u; };

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int cw = (warp >> 2) - 1, ctid = tid - 128, wtid = ctid & 127, w = warp & 3;
  const int g = lane >> 2, t4 = lane & 3;
  const bool odd = (g & 1) != 0;
  float* red_max = scratch + cw * 12 * NQ;  // [2][4][NQ]
  float* red_sum = red_max + 8 * NQ;        // [4][NQ]
  // wgmma descriptor bases (stage 0): the K tile (A) and Q (B) for S^T, both K-major; this
  // consumer's V columns read transposed (A, MN-major) and its P^T (B, K-major) for O^T.
  const uint32_t sPc = sP + cw * (NQ * 128);
  const uint64_t k_desc0 = make_desc(sKV, 16, 1024);
  const uint64_t q_desc = make_desc(sQ, 16, 1024);
  const uint64_t v_desc0 = make_desc(sKV + cw * OB * T::CHUNK_BYTES, T::CHUNK_BYTES, 1024);
  const uint64_t p_desc = make_desc(sPc, 16, 1024);

  float o[OB][NR];
  float s[NR];
  int it = 0;
  for (int req = begin_req; req <= end_req; ++req) {
    const int seqlen = p.seqlens[req];
    int tok_begin, tok_end;
    const int n_tiles = token_range(req, seqlen, tok_begin, tok_end);
    const int split_idx = req == begin_req ? begin_split : 0;
    const int split_base = p.num_splits[req];
    const bool whole = p.num_splits[req + 1] - split_base == 1;

    named_barrier(1, 256);  // both consumers are done with sQ
    load_q<NQ, T::CHUNKS, T::BM, 0>(p, sQ, req, hk, 0, ctid);  // one row block: row0 = 0
    named_barrier(1, 256);

    float m_run[SLOTS], l_run[SLOTS];  // l_run: this thread's part of the column sums
    int vis_end[SLOTS];
#pragma unroll
    for (int q = 0; q < SLOTS; ++q) {
      const int n = 8 * (q >> 1) + 2 * t4 + (q & 1);
      m_run[q] = neg_inf();
      l_run[q] = 0.f;
      vis_end[q] = p.causal ? seqlen - p.s_q + min(n, p.m - 1) / p.ngroups + 1 : seqlen;
    }
#pragma unroll
    for (int b = 0; b < OB; ++b)
#pragma unroll
      for (int k = 0; k < NR; ++k) o[b][k] = 0.f;

    // S^T over the tile in stage `stage`, issued chunk by chunk as the chunks land.
    auto issue_s = [&](int stage, uint32_t phase) {
      const uint64_t k_desc = desc_add(k_desc0, stage * T::STAGE_BYTES);
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < T::CHUNKS; ++c) {
        mbar_wait(full_bar(stage, c), phase);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          wgmma_ss<NQ, kBf16>(s, desc_add(k_desc, c * T::CHUNK_BYTES + kk * 32),
                              desc_add(q_desc, c * (T::BM * 128) + kk * 32), (c | kk) != 0);
      }
      wgmma_commit();
    };
#pragma unroll
    for (int k = 0; k < NR; ++k) s[k] = 0.f;
    if (n_tiles > 0) issue_s(it % T::STAGES, (it / T::STAGES) & 1);

    for (int tile = 0; tile < n_tiles; ++tile, ++it) {
      const int stage = it % T::STAGES;
      const uint32_t sK = sKV + stage * T::STAGE_BYTES;
      const int t0 = tok_begin + tile * T::BN;
      wgmma_wait<0>();  // S^T of this tile complete (O^T of the previous one was waited for)
      fence_regs<NR>(s);
#pragma unroll
      for (int b = 0; b < OB; ++b) fence_regs<NR>(o[b]);

      // ---- V rows past the request's end hold no data of it (stale or NaN): zero the ones
      // this consumer multiplies, before O^T reads them.
      const int valid = seqlen - t0;
      if (valid < T::BN) {
        for (int idx = wtid; idx < OB * T::BN * 8; idx += 128) {
          const int c = idx / (T::BN * 8), r = (idx >> 3) % T::BN, j = idx & 7;
          if (r >= valid) {
            const uint32_t a = sK + (cw * OB + c) * T::CHUNK_BYTES + r * 128 + j * 16;
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(a), "r"(0) : "memory");
          }
        }
        fence_async_smem();
        named_barrier(2 + cw, 128);
      }

      // ---- mask, scale to log2 units, column maxima over the tile's 64 tokens ----------------
      // s[4 j + 2 h + e]: token t0 + 16 w + g + 8 h, query column 8 j + 2 t4 + e.
      const int tok0 = t0 + 16 * w + g;
      float mx[SLOTS];
#pragma unroll
      for (int q = 0; q < SLOTS; ++q) mx[q] = neg_inf();
#pragma unroll
      for (int j = 0; j < NQ / 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int q = 2 * j + e, tok = tok0 + 8 * h;
            const bool ok = tok < tok_end && tok < vis_end[q];
            float& v = s[4 * j + 2 * h + e];
            // By selection, not a multiply by a mask: the other consumer may be zeroing the V
            // rows of tokens past the end (K's first columns) while this S^T reads them, and
            // both consumers must get the same m and l (only consumer 0 writes the lse).
            v = select(ok, v * p.scale_log2, neg_inf());
            mx[q] = fmaxf(mx[q], v);
          }
      float* rmax = red_max + (it & 1) * 4 * NQ;
#pragma unroll
      for (int q = 0; q < SLOTS; ++q) {
        mx[q] = fmaxf(mx[q], __shfl_xor_sync(0xffffffffu, mx[q], 4));
        mx[q] = fmaxf(mx[q], __shfl_xor_sync(0xffffffffu, mx[q], 8));
        mx[q] = fmaxf(mx[q], __shfl_xor_sync(0xffffffffu, mx[q], 16));
        if (g == 0) rmax[w * NQ + 8 * (q >> 1) + 2 * t4 + (q & 1)] = mx[q];
      }
      named_barrier(2 + cw, 128);
      float m_use[SLOTS], alpha[SLOTS];
#pragma unroll
      for (int q = 0; q < SLOTS; ++q) {
        const int n = 8 * (q >> 1) + 2 * t4 + (q & 1);
        const float m_tile = fmaxf(fmaxf(rmax[n], rmax[NQ + n]), fmaxf(rmax[2 * NQ + n], rmax[3 * NQ + n]));
        const float m_new = fmaxf(m_run[q], m_tile);
        m_use[q] = m_new == neg_inf() ? 0.f : m_new;  // a column with nothing visible yet stays at zero
        alpha[q] = fast_exp2(m_run[q] - m_use[q]);
        m_run[q] = m_new;
        l_run[q] *= alpha[q];
      }

      // ---- P^T = exp2(S^T - m) into this consumer's buffer: row n (query column), 64 tokens ----
#pragma unroll
      for (int j = 0; j < NQ / 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float v[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            v[e] = fast_exp2(s[4 * j + 2 * h + e] - m_use[2 * j + e]);
            l_run[2 * j + e] += v[e];
          }
          float lo, hi;
          pair_rows(v[0], v[1], odd, lo, hi);
          const int n = 8 * j + 2 * t4 + (odd ? 1 : 0), tok = 16 * w + (g & ~1) + 8 * h;
          const uint32_t a = sPc + n * 128 + (((tok >> 3) ^ (n & 7)) << 4) + (tok & 7) * 2;
          asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(a), "r"(pack2<kBf16>(lo, hi)) : "memory");
        }
      fence_async_smem();

      // ---- rescale O^T where a column maximum moved ------------------------------------------
      bool moved = false;
#pragma unroll
      for (int q = 0; q < SLOTS; ++q) moved |= alpha[q] != 1.f;
      if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
        for (int b = 0; b < OB; ++b)
#pragma unroll
          for (int k = 0; k < NR; ++k) o[b][k] *= alpha[2 * (k >> 2) + (k & 1)];
      }
      named_barrier(2 + cw, 128);  // P^T of the consumer's 4 warps is in shared memory

      // ---- O^T[256 cw : 256 cw + 256, :] += V^T P^T ----------------------------------------------
      const uint64_t v_desc = desc_add(v_desc0, stage * T::STAGE_BYTES);
      wgmma_fence();
#pragma unroll
      for (int b = 0; b < OB; ++b)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          wgmma_ss_ta<NQ, kBf16>(o[b], desc_add(v_desc, b * T::CHUNK_BYTES + kk * 16 * 128), desc_add(p_desc, kk * 32), 1);
      wgmma_commit();
      // The next tile's S^T goes into the tensor-core queue right behind; this stage is released
      // once O^T is complete.
      if (tile + 1 < n_tiles) {
        issue_s((it + 1) % T::STAGES, ((it + 1) / T::STAGES) & 1);
        wgmma_wait<1>();
      } else {
        wgmma_wait<0>();
      }
#pragma unroll
      for (int b = 0; b < OB; ++b) fence_regs<NR>(o[b]);
      __syncwarp();
      // Both consumers read every chunk: the stage goes back whole, through region 1's barrier
      // (the producer of the transposed form waits on that one only).
      if (lane == 0) mbar_arrive(empty_bar(stage, 1));
    }

    // ---- epilogue: column sums over the consumer's warps, then its 256 output columns --------
#pragma unroll
    for (int q = 0; q < SLOTS; ++q) {
      l_run[q] += __shfl_xor_sync(0xffffffffu, l_run[q], 4);
      l_run[q] += __shfl_xor_sync(0xffffffffu, l_run[q], 8);
      l_run[q] += __shfl_xor_sync(0xffffffffu, l_run[q], 16);
      if (g == 0) red_sum[w * NQ + 8 * (q >> 1) + 2 * t4 + (q & 1)] = l_run[q];
    }
    named_barrier(2 + cw, 128);
#pragma unroll
    for (int j = 0; j < NQ / 8; ++j) {
      float inv_l[2], l_col[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int n = 8 * j + 2 * t4 + e;
        l_col[e] = red_sum[n] + red_sum[NQ + n] + red_sum[2 * NQ + n] + red_sum[3 * NQ + n];
        inv_l[e] = l_col[e] > 0.f ? 1.f / l_col[e] : 0.f;
      }
      // This lane stores column n (its even or odd one) for output rows 2 k, 2 k + 1 of each block.
      const int n = 8 * j + 2 * t4 + (odd ? 1 : 0);
      const float m_col = odd ? m_run[2 * j + 1] : m_run[2 * j];
      const float l = odd ? l_col[1] : l_col[0];
      const bool row_ok = n < p.m;
      const int i = n / p.ngroups, head = hk * p.ngroups + n % p.ngroups;
      const int64_t slot = (int64_t)(split_base + split_idx) * p.h_kv + hk;
#pragma unroll
      for (int b = 0; b < OB; ++b)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float lo, hi;
          pair_rows(o[b][4 * j + 2 * h] * inv_l[0], o[b][4 * j + 2 * h + 1] * inv_l[1], odd, lo, hi);
          const int col = cw * T::HALF_DV + b * 64 + 16 * w + (g & ~1) + 8 * h;
          if (!row_ok) continue;
          if (whole) {
            char* orow = static_cast<char*>(p.out) + 2 * (req * p.o_stride_b + i * p.o_stride_s + (int64_t)head * p.o_stride_h);
            store_u32(orow + 2 * col, pack2<kBf16>(lo, hi));
          } else {
            *reinterpret_cast<float2*>(p.o_accum + (slot * p.m + n) * DV + col) = make_float2(lo, hi);
          }
        }
      if (row_ok && cw == 0 && w == 0 && g < 2) {  // lanes 0..7: g 0 (even columns) and 1 (odd)
        if (whole)
          p.lse[req * p.lse_stride_b + head * p.lse_stride_h + i * p.lse_stride_s] =
              l > 0.f ? (m_col + log2f(l)) * kLn2 : pos_inf();
        else
          p.lse_accum[slot * p.m + n] = l > 0.f ? m_col + log2f(l) : neg_inf();
      }
    }
  }
}

// The two bf16/fp16 values of a packed pair times f, packed again.
template <bool IsBf16>
MLA_DEVICE uint32_t scale2(uint32_t v, float f) {
  float lo, hi;
  if constexpr (IsBf16) {
    lo = __uint_as_float(v << 16);
    hi = __uint_as_float(v & 0xffff0000u);
  } else {
    asm("{\n.reg .f16 a, b;\nmov.b32 {a, b}, %2;\ncvt.f32.f16 %0, a;\ncvt.f32.f16 %1, b;\n}\n"
        : "=f"(lo), "=f"(hi)
        : "r"(v));
  }
  return pack2<IsBf16>(lo * f, hi * f);
}

// A consumer's reference maximum moves only when a row's maximum grows by more than this (log2
// units; P <= 2^8 fits bf16 and fp16 with their full relative precision), so O is rescaled in
// few tiles.
constexpr float kLazyRescale = 8.f;

// ---- consumers of the pair form (more than 16 query rows) ------------------------------------------
// Tiles go in pairs, A = tile 2k and B = tile 2k + 1 (the two stages of the ring). Consumer L
// (ROLE 0) computes S_A = Q K_A^T over the whole head dim (wgmma m64n64), consumer R (ROLE 1)
// S_B. The reference maxima form a chain: L turns S_A into P_A against m0 (the pair before's
// reference, moved lazily by S_A's maxima) and publishes m0; R waits for m0, turns S_B into P_B
// against m1 (m0 moved lazily by S_B's maxima) and publishes m1. Each consumer accumulates its
// 256 output columns over both tiles:
//   L: O_L += P_A V_A,L (P_A from registers); once m1 is known, P_A' = P_A 2^(m0 - m1) goes to
//      shared memory for R, O_L is rescaled to m1 and O_L += P_B V_B,L (P_B from shared memory);
//      then L issues the next pair's S_A.
//   R: O_R is rescaled to m1; O_R += P_B V_B,R (registers), O_R += P_A' V_A,R (shared memory);
//      then R issues the next pair's S_B.
// So L's softmax overlaps R's Q K^T, and R's softmax overlaps L's P V: the tensor cores take
// the two consumers' work in turn. A stage is released in two regions, each by the consumer
// whose P V reads it, once that P V is complete: V columns [0, 256) (chunks 0..3) by L, the
// rest by R (the tile's S is complete before either P V starts). Named barriers of 256
// threads, each one consumer's arrive and the other's sync per pair: M0 (m0 published), M1 (m1
// published), PA (P_A' published), PB (P_B published and R's P V on A issued). Where both must
// meet (at each request's start and in the epilogue), L arrives at MEET_L and waits at MEET_R
// and R the other way round, so that every round of a barrier is waited on at one instruction
// (the two roles are separate code: bar.sync is aligned, undefined when one round's threads
// wait at different instructions).
template <class Elem, int D, int DV, int PAGE_BOX, int ROLE, class TokenRange>
MLA_DEVICE void consume_pairs(const DecodeParams& p, uint32_t sQ, uint32_t sKV, uint32_t sP, uint32_t bars,
                              float* sM, float* sSum, int row0, int hk,
                              TokenRange token_range) {
  using T = DecodeTraits<D, DV, PAGE_BOX>;
  constexpr bool kBf16 = Elem::kIsBf16;
  constexpr int BAR_M0 = 4, BAR_M1 = 5, BAR_PA = 6, BAR_PB = 7, BAR_MEET_L = 8, BAR_MEET_R = 9;
  auto meet = [] {  // both consumers: what either did before it is seen by both after it
    if constexpr (ROLE == 0) {
      named_barrier_arrive<256>(BAR_MEET_L);
      named_barrier(BAR_MEET_R, 256);
    } else {
      named_barrier(BAR_MEET_L, 256);
      named_barrier_arrive<256>(BAR_MEET_R);
    }
  };
  auto full_bar = [&](int stage, int c) { return bars + uint32_t(stage * T::CHUNKS + c) * 8u; };
  auto empty_bar = [&](int stage, int region) { return bars + uint32_t(T::STAGES * T::CHUNKS + 2 * stage + region) * 8u; };

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int ctid = tid - 128;   // 0..255 over both consumers
  const int wtid = ctid & 127;  // thread within this consumer
  const int g = lane >> 2, t4 = lane & 3;
  const int r0 = (warp & 3) * 16 + g;  // this thread's rows r0 and r0 + 8 of the tile
  // P_A' (published by L) in the P region, P_B (published by R) in the shared memory of Q's
  // register-held chunk; the reference of each consumer in sM[ROLE][64].
  const uint32_t sPA = sP, sPB = sQ + T::Q_SMEM_CHUNKS * (T::BM * 128);
  float* sM_own = sM + ROLE * T::BM;
  const float* sM_l = sM;
  const float* sM_r = sM + T::BM;
  // wgmma descriptor bases (stage 0): Q and the whole 64-token K tile for S = Q K^T (K-major);
  // the published P (K-major) and this consumer's V columns, read transposed (MN-major).
  // Each is Q's descriptor plus a constant (the regions sit at fixed offsets from sQ), so that
  // only one is kept in registers.
  const uint64_t q_desc = make_desc(sQ, 16, 1024);
  const uint64_t k_desc0 = desc_add(q_desc, T::Q_BYTES);
  const uint64_t pa_desc = desc_add(q_desc, T::Q_BYTES + T::STAGES * T::STAGE_BYTES);
  const uint64_t pb_desc = desc_add(q_desc, T::Q_SMEM_CHUNKS * (T::BM * 128));
  // (V's LBO field: CHUNK_BYTES in place of Q's 16; start addresses stay below 2^18 bytes, so
  // no field carries into the next)
  const uint64_t v_desc0 = desc_add(q_desc, T::Q_BYTES + ROLE * T::V_CHUNKS * T::CHUNK_BYTES) +
                           (uint64_t((T::CHUNK_BYTES - 16) >> 4) << 16);

  float o[128];
  float s[32];
  int it = 0;
  // The part's request range is read from the scheduler row where it is used, not held in
  // registers over the tiles (the fp16 page-8 variants spilled it).
  auto sched_at = [&](int k) {
    int v;
    asm volatile("ld.global.nc.b32 %0, [%1];\n" : "=r"(v) : "l"(p.sched + blockIdx.z * 8 + k));
    return v;
  };
  for (int req = sched_at(0); req <= sched_at(1); ++req) {
    const int seqlen = p.seqlens[req];
    int tok_begin, tok_end;
    const int n_tiles = token_range(req, seqlen, tok_begin, tok_end);

    meet();  // both consumers are done with sQ (P_B included) and the statistics
    // (the copy loop not unrolled: unrolled, it made the fp16 variants spill)
    load_q<T::BM, T::CHUNKS, T::BM, 1>(p, sQ, req, hk, row0, ctid);
    meet();
    // This thread's A fragments of the register-held Q chunks (rows r0 and r0 + 8; k-step kk
    // covers columns 16 kk .. 16 kk + 15 of the chunk, 16-byte pieces 2 kk and 2 kk + 1).
    uint32_t qa[T::Q_REG_CHUNKS][4][4];
#pragma unroll
    for (int cq = 0; cq < T::Q_REG_CHUNKS; ++cq)
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int r = r0 + 8 * (x & 1), piece = 2 * kk + (x >> 1);
          const uint32_t a = sQ + (T::Q_SMEM_CHUNKS + cq) * (T::BM * 128) + r * 128 + ((piece ^ (r & 7)) << 4) + t4 * 4;
          asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(qa[cq][kk][x]) : "r"(a) : "memory");
        }
    // Both consumers hold their fragments before R publishes P_B over that chunk.
    meet();

    float m_run[2] = {neg_inf(), neg_inf()}, l_run[2] = {0.f, 0.f};
    int vis_end[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + r0 + 8 * h;
      vis_end[h] = p.causal ? seqlen - p.s_q + min(row, p.m - 1) / p.ngroups + 1 : seqlen;
    }
#pragma unroll
    for (int k = 0; k < 128; ++k) o[k] = 0.f;

    // S = Q K^T over chunks [c0, c1) of the tile `tile` of this request (one commit group),
    // issued chunk by chunk as the chunks land (not waited for).
    auto issue_s = [&](int tile, int c0, int c1) {
      const int stage = (it + tile) % T::STAGES;
      const uint32_t phase = ((it + tile) / T::STAGES) & 1;
      const uint64_t k_desc = desc_add(k_desc0, stage * T::STAGE_BYTES);
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < T::CHUNKS; ++c) {
        if (c < c0 || c >= c1) continue;
        mbar_wait(full_bar(stage, c), phase);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const uint64_t db = desc_add(k_desc, c * T::CHUNK_BYTES + kk * 32);
          if (c < T::Q_SMEM_CHUNKS) {
            wgmma_ss<64, kBf16>(s, desc_add(q_desc, c * (T::BM * 128) + kk * 32), db, (c | kk) != 0);
          } else {
            wgmma_rs<64, kBf16>(s, qa[c - T::Q_SMEM_CHUNKS][kk], db, 1);
          }
        }
      }
      wgmma_commit();
    };
    // V rows past the request's end hold no data of it (stale or NaN): zero this consumer's V
    // columns of them in the tile `tile` before its P V reads them (after every S on the tile).
    auto zero_tail = [&](int tile) {
      const int t0 = tok_begin + tile * T::BN;
      const int valid = seqlen - t0;
      if (valid < T::BN) {
        const uint32_t sK = sKV + ((it + tile) % T::STAGES) * T::STAGE_BYTES;
        for (int idx = wtid; idx < T::V_CHUNKS * T::BN * 8; idx += 128) {
          const int c = idx / (T::BN * 8), r = (idx >> 3) % T::BN, j = idx & 7;
          if (r >= valid) {
            const uint32_t a = sK + (ROLE * T::V_CHUNKS + c) * T::CHUNK_BYTES + r * 128 + j * 16;
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(a), "r"(0) : "memory");
          }
        }
        fence_async_smem();
        named_barrier(2 + ROLE, 128);
      }
    };
    // Scale S of tile `tile` to log2 units, mask the tokens these rows do not see, and return
    // the row maxima (over the quad: the 64 tokens).
    auto scale_mask_max = [&](int tile, float* mx) {
      const int t0 = tok_begin + tile * T::BN;
      mx[0] = mx[1] = neg_inf();
      if (t0 + T::BN <= min(tok_end, min(vis_end[0], vis_end[1]))) {
#pragma unroll
        for (int k = 0; k < 32; ++k) {
          s[k] *= p.scale_log2;
          mx[(k >> 1) & 1] = fmaxf(mx[(k >> 1) & 1], s[k]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int h = e >> 1;
            const int tok = t0 + j * 8 + 2 * t4 + (e & 1);
            const bool ok = tok < tok_end && tok < vis_end[h];
            s[j * 4 + e] = ok ? s[j * 4 + e] * p.scale_log2 : neg_inf();
            mx[h] = fmaxf(mx[h], s[j * 4 + e]);
          }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      }
    };
    // P = 2^(S - m) in s (fp32) and its row sums; the A fragments of P in pa.
    auto exp_and_pack = [&](const float* m_use, float* rs, uint32_t (*pa)[4]) {
      rs[0] = rs[1] = 0.f;
#pragma unroll
      for (int k = 0; k < 32; ++k) {
        s[k] = fast_exp2(s[k] - m_use[(k >> 1) & 1]);
        rs[(k >> 1) & 1] += s[k];
      }
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        pa[kk][0] = pack2<kBf16>(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = pack2<kBf16>(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = pack2<kBf16>(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = pack2<kBf16>(s[8 * kk + 6], s[8 * kk + 7]);
      }
    };
    // Store P (its A fragments pa; with `scaled`, times f per row) to `dst` as the A operand
    // of the other consumer's P V. (Fragment register 2 (j % 2) + h holds row r0 + 8 h, 8-column
    // group j of k-step j / 2.)
    auto publish_p = [&](uint32_t dst, uint32_t (*pa)[4], bool scaled, const float* f) {
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = r0 + 8 * h;
          const uint32_t a = dst + r * 128 + ((j ^ (r & 7)) << 4) + t4 * 4;
          const uint32_t v = pa[j >> 1][(j & 1) * 2 + h];
          asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(a), "r"(scaled ? scale2<kBf16>(v, f[h]) : v) : "memory");
        }
      fence_async_smem();
    };
    auto release = [&](int tile) {  // this consumer's region of tile `tile` is read for good
      __syncwarp();
      if (lane == 0) mbar_arrive(empty_bar((it + tile) % T::STAGES, ROLE));
    };
    auto v_desc = [&](int tile) { return desc_add(v_desc0, ((it + tile) % T::STAGES) * T::STAGE_BYTES); };
    // O += P V over this consumer's V columns of tile `tile` (one commit group, not waited for;
    // the tile's V rows past the request's end zeroed first), P from this consumer's registers
    // (its A fragments pa) or from the other's shared memory (descriptor p_desc).
    auto pv_regs = [&](int tile, uint32_t (*pa)[4]) {
      zero_tail(tile);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) wgmma_rs_tb<256, kBf16>(o, pa[kk], desc_add(v_desc(tile), kk * 16 * 128), 1);
      wgmma_commit();
    };
    auto pv_smem = [&](int tile, uint64_t p_desc) {
      zero_tail(tile);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_ss_tb<256, kBf16>(o, desc_add(p_desc, kk * 32), desc_add(v_desc(tile), kk * 16 * 128), 1);
      wgmma_commit();
    };

#pragma unroll
    for (int k = 0; k < 32; ++k) s[k] = 0.f;
    if (ROLE < n_tiles) issue_s(ROLE, 0, T::CHUNKS);
    const int n_pairs = (n_tiles + 1) / 2;
    for (int k = 0; k < n_pairs; ++k) {
      const int ta = 2 * k, tb = 2 * k + 1;
      const bool has_b = tb < n_tiles;
      const bool more = 2 * (k + 1) + ROLE < n_tiles;  // this consumer's tile of the next pair exists
      wgmma_wait<0>();  // this consumer's S of the pair (and every P V before it) complete
      fence_regs<32>(s);
      fence_regs<128>(o);
      uint32_t pa[4][4];
      if constexpr (ROLE == 0) {
        // ---- L: softmax of tile A against m0 ---------------------------------------------------
        float mx[2], m_use0[2], alpha[2], rs[2];
        scale_mask_max(ta, mx);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float m_new = fmaxf(m_run[h], mx[h]);
          // (a difference, exact by Sterbenz, not m_run + 8, which rounds for huge m_run)
          const float m_ref = m_new - m_run[h] > kLazyRescale ? m_new : m_run[h];
          m_use0[h] = m_ref == neg_inf() ? 0.f : m_ref;  // a row with nothing visible yet stays at zero
          alpha[h] = fast_exp2(m_run[h] - m_use0[h]);
          m_run[h] = m_ref;
        }
        if (t4 == 0) {
          sM_own[r0] = m_run[0];
          sM_own[r0 + 8] = m_run[1];
        }
        named_barrier_arrive<256>(BAR_M0);
        exp_and_pack(m_use0, rs, pa);
        if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
          for (int q = 0; q < 128; ++q) o[q] *= alpha[(q >> 1) & 1];
        }
        l_run[0] = l_run[0] * alpha[0] + rs[0];
        l_run[1] = l_run[1] * alpha[1] + rs[1];
        // ---- O_L += P_A V_A,L ------------------------------------------------------------------
        pv_regs(ta, pa);
        wgmma_wait<0>();
        fence_regs<128>(o);
        release(ta);
        // ---- m1 from R; P_A' = P_A 2^(m0 - m1) for R; O_L to m1 ---------------------------------
        named_barrier(BAR_M1, 256);
        float f[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float m_ref1 = sM_r[r0 + 8 * h];
          const float m_use1 = m_ref1 == neg_inf() ? 0.f : m_ref1;
          // From m0 (not its stand-in 0 while nothing is visible: P_A, O_L and l_L are then 0,
          // and f = 0 keeps them so, where 2^(0 - m1) could overflow to inf).
          f[h] = fast_exp2(m_run[h] - m_use1);
          m_run[h] = m_ref1;
        }
        publish_p(sPA, pa, true, f);  // (P_A rounded twice where f != 1: rare, the reference moves lazily)
        named_barrier_arrive<256>(BAR_PA);
        named_barrier(BAR_PB, 256);  // P_B published (and R's P V on A issued)
        if (__any_sync(0xffffffffu, f[0] != 1.f || f[1] != 1.f)) {
#pragma unroll
          for (int q = 0; q < 128; ++q) o[q] *= f[(q >> 1) & 1];
        }
        l_run[0] *= f[0];
        l_run[1] *= f[1];
        // ---- O_L += P_B V_B,L, then the next pair's S_A behind it --------------------------------
        if (has_b) pv_smem(tb, pb_desc);
        // The next S_A's first region behind it; once P V on B is complete, region L of B goes
        // back to the producer, then the rest of S_A.
        if (more) {
          issue_s(ta + 2, 0, T::V_CHUNKS);
          wgmma_wait<1>();
        } else {
          wgmma_wait<0>();
        }
        fence_regs<128>(o);
        if (has_b) release(tb);
        if (more) issue_s(ta + 2, T::V_CHUNKS, T::CHUNKS);
      } else {
        // ---- R: softmax of tile B against m1 (m0 moved by S_B's maxima) ---------------------------
        named_barrier(BAR_M0, 256);
        float mx[2] = {neg_inf(), neg_inf()}, m_use1[2], alpha[2], rs[2] = {0.f, 0.f};
        if (has_b) scale_mask_max(tb, mx);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float m0 = sM_l[r0 + 8 * h];
          const float m_new = fmaxf(m0, mx[h]);
          const float m_ref = m_new - m0 > kLazyRescale ? m_new : m0;
          m_use1[h] = m_ref == neg_inf() ? 0.f : m_ref;
          alpha[h] = fast_exp2(m_run[h] - m_use1[h]);  // O_R from the pair before's reference to m1
          m_run[h] = m_ref;
        }
        if (t4 == 0) {
          sM_own[r0] = m_run[0];
          sM_own[r0 + 8] = m_run[1];
        }
        named_barrier_arrive<256>(BAR_M1);
        if (has_b) exp_and_pack(m_use1, rs, pa);
        if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
          for (int q = 0; q < 128; ++q) o[q] *= alpha[(q >> 1) & 1];
        }
        l_run[0] = l_run[0] * alpha[0] + rs[0];
        l_run[1] = l_run[1] * alpha[1] + rs[1];
        if (has_b) publish_p(sPB, pa, false, nullptr);
        // ---- O_R += P_A' V_A,R, then O_R += P_B V_B,R --------------------------------------------
        // A first: R's region of A is the last part of A's stage to be freed, and the next A
        // tile (the next S_A, L's, which starts the next pair) waits for it. B's stage is freed
        // last by L's P V on B, after both of these, so its R region gains nothing from going
        // back first.
        named_barrier(BAR_PA, 256);
        pv_smem(ta, pa_desc);
        if (has_b) pv_regs(tb, pa);
        named_barrier_arrive<256>(BAR_PB);
        if (has_b) {
          wgmma_wait<1>();  // P V on A complete: its region goes back while P V on B runs
          release(ta);
          wgmma_wait<0>();
          fence_regs<128>(o);
          release(tb);
        } else {
          wgmma_wait<0>();
          fence_regs<128>(o);
          release(ta);
        }
        if (more) issue_s(tb + 2, 0, T::CHUNKS);
      }
    }
    wgmma_wait<0>();
    fence_regs<128>(o);
    it += n_tiles;

    // ---- epilogue: row sums of both consumers, then this consumer's 256 columns --------------
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
    }
    if (t4 == 0) {
      sSum[ROLE * T::BM + r0] = l_run[0];
      sSum[ROLE * T::BM + r0 + 8] = l_run[1];
    }
    meet();  // (and every S and P V of both consumers is complete: Q's shared memory is free)
    const int split_idx = req == sched_at(0) ? sched_at(4) : 0;
    const int split_base = p.num_splits[req];
    const bool whole = p.num_splits[req + 1] - split_base == 1;
    const int64_t slot = (int64_t)(split_base + split_idx) * p.h_kv + hk;
    float inv_l[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + r0 + 8 * h;
      const float l = l_run[h] + sSum[(1 - ROLE) * T::BM + r0 + 8 * h];
      inv_l[h] = l > 0.f ? 1.f / l : 0.f;
      if (ROLE == 0 && t4 == 0 && row < p.m) {
        const int i = row / p.ngroups, head = hk * p.ngroups + row % p.ngroups;
        if (whole)
          p.lse[req * p.lse_stride_b + head * p.lse_stride_h + i * p.lse_stride_s] =
              l > 0.f ? (m_run[h] + log2f(l)) * kLn2 : pos_inf();
        else
          p.lse_accum[slot * p.m + row] = l > 0.f ? m_run[h] + log2f(l) : neg_inf();
      }
    }
    // O goes out through shared memory: this consumer's half rows are staged in its 32 KB of
    // Q's region (16-byte units XOR-swizzled by the row), then each warp copies whole half
    // rows with 16-byte stores, 512 contiguous bytes per instruction (stored straight from
    // the fragments, an instruction touched 8 rows: 5.3 us per request at b128 h128, now 3.7).
    // fp32 partial rows take two rounds, the rows of fragment half h in round h.
    const uint32_t stage_o = sQ + ROLE * (T::BM * T::HALF_DV * 2);
    if (whole) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = r0 + 8 * h;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          const uint32_t a = stage_o + r * 512 + ((j ^ (r & 7)) << 4) + t4 * 4;
          asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(a),
                       "r"(pack2<kBf16>(o[j * 4 + 2 * h] * inv_l[h], o[j * 4 + 2 * h + 1] * inv_l[h]))
                       : "memory");
        }
      }
      named_barrier(2 + ROLE, 128);
      for (int r = warp & 3; r < T::BM; r += 4) {
        const int row = row0 + r;
        if (row >= p.m) break;
        const int i = row / p.ngroups, head = hk * p.ngroups + row % p.ngroups;
        char* orow = static_cast<char*>(p.out) +
                     2 * (req * p.o_stride_b + i * p.o_stride_s + (int64_t)head * p.o_stride_h + ROLE * T::HALF_DV);
        uint4 v;
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "r"(stage_o + r * 512 + ((lane ^ (r & 7)) << 4)));
        *reinterpret_cast<uint4*>(orow + lane * 16) = v;
      }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int sr = (warp & 3) * 8 + g;  // staging row of fragment row r0 + 8 h
        if (h == 1) named_barrier(2 + ROLE, 128);  // round 0 is read out
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          const int unit = 2 * j + (t4 >> 1);
          const uint32_t a = stage_o + sr * 1024 + ((unit ^ (sr & 7)) << 4) + (t4 & 1) * 8;
          asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(a), "f"(o[j * 4 + 2 * h] * inv_l[h]),
                       "f"(o[j * 4 + 2 * h + 1] * inv_l[h])
                       : "memory");
        }
        named_barrier(2 + ROLE, 128);
        for (int q = warp & 3; q < T::BM / 2; q += 4) {
          const int r = (q >> 3) * 16 + 8 * h + (q & 7);  // the tile row of staging row q
          const int row = row0 + r;
          if (row >= p.m) continue;
          float* orow = p.o_accum + (slot * p.m + row) * DV + ROLE * T::HALF_DV;
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            const int unit = lane + 32 * k;
            float4 v;
            asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                         : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                         : "r"(stage_o + q * 1024 + ((unit ^ (q & 7)) << 4)));
            *reinterpret_cast<float4*>(orow + unit * 4) = v;
          }
        }
      }
    }
  }
}

template <class Elem, int D, int DV, int PAGE_BOX, int NQ = 0>
__global__ void __launch_bounds__(DecodeTraits<D, DV, PAGE_BOX>::THREADS, 1)
    decode_sm90_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ TmaDesc kv_map) {
  using T = DecodeTraits<D, DV, PAGE_BOX>;
  // Once every CTA of the grid (about one wave) has started, the combine behind it (a
  // programmatic launch) may be scheduled: its CTAs take SMs as they free and wait there.
  pdl_launch_dependents();
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw_addr = smem_addr(smem_raw);
  const uint32_t sQ = (raw_addr + 1023u) & ~1023u;
  const uint32_t sKV = sQ + T::Q_BYTES;
  const uint32_t sP = sKV + T::STAGES * T::STAGE_BYTES;
  float* sRef = reinterpret_cast<float*>(smem_raw + (sP + T::P_BYTES - raw_addr));
  float* sSum = sRef + 2 * T::BM;
  const uint32_t bars = sP + T::P_BYTES + T::STAT_BYTES;
  auto full_bar = [&](int stage, int c) { return bars + uint32_t(stage * T::CHUNKS + c) * 8u; };
  auto empty_bar = [&](int stage, int region) { return bars + uint32_t(T::STAGES * T::CHUNKS + 2 * stage + region) * 8u; };

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  if (tid == 0) {
    for (int s = 0; s < T::STAGES; ++s) {
      for (int c = 0; c < T::CHUNKS; ++c) mbar_init(full_bar(s, c), 1);
      // One arrival per warp that reads the region: the pair form releases region r from
      // consumer r's 4 warps, the transposed form a stage whole from all 8 consumer warps
      // (region 1's barrier; region 0's is not used there).
      for (int r = 0; r < 2; ++r) mbar_init(empty_bar(s, r), NQ != 0 ? 8 : 4);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int hk = blockIdx.y;
  const int row0 = blockIdx.x * T::BM;
  const int32_t* sched = p.sched + blockIdx.z * 8;
  const int begin_req = sched[0], end_req = sched[1], begin_split = sched[4];
  // Token range [tok_begin, tok_end) of request `req` in this part; producer and consumers
  // derive the same tile sequence from it. (Its inputs are read from the scheduler row at each
  // request, not held in registers over the tiles.)
  auto token_range = [&](int req, int seqlen, int& tok_begin, int& tok_end) {
    const int32_t* row = p.sched + blockIdx.z * 8;
    tok_begin = req == row[0] ? row[2] * 64 : 0;
    tok_end = req == row[1] ? min(row[3] * 64, seqlen) : seqlen;
    // Causal: the last row of this CTA sees keys up to seqlen - s_q + i_max.
    const int i_max = (min(row0 + T::BM, p.m) - 1) / p.ngroups;
    if (p.causal) tok_end = min(tok_end, seqlen - p.s_q + i_max + 1);
    return tok_end > tok_begin ? (tok_end - tok_begin + T::BN - 1) / T::BN : 0;
  };

  if (warp < 4) {
    // ================= producer warpgroup: warp 0 issues the KV tiles ======================
    setmaxnreg_dec<T::PRODUCER_REGS>();
    if (warp != 0) return;
    const uint64_t policy = evict_first_policy();
    int it = 0;
    for (int req = begin_req; req <= end_req; ++req) {
      const int seqlen = p.seqlens[req];
      int tok_begin, tok_end;
      const int n_tiles = token_range(req, seqlen, tok_begin, tok_end);
      const int32_t* bt_row = p.block_table + req * p.bt_stride_b;
      for (int tile = 0; tile < n_tiles; ++tile, ++it) {
        const int t0 = tok_begin + tile * T::BN;
        // Only pages holding tokens < seqlen are read: entries past the last page are never
        // looked up. Lane b looks up box b.
        const int nbox = (min(T::BN, seqlen - t0) + PAGE_BOX - 1) / PAGE_BOX;
        int blk = 0, in_page = 0;
        if (lane < nbox) {
          const int tok = t0 + lane * PAGE_BOX;
          const int page = tok / p.page_size;
          blk = bt_row[page];
          in_page = tok - page * p.page_size;
        }
        int box_blk[T::BOXES], box_tok[T::BOXES];
#pragma unroll
        for (int b = 0; b < T::BOXES; ++b) {
          box_blk[b] = __shfl_sync(0xffffffffu, blk, b);
          box_tok[b] = __shfl_sync(0xffffffffu, in_page, b);
        }
        const int stage = it % T::STAGES;
        // The pair form frees the two regions of a stage separately (each once its readers are
        // done); the transposed form frees a stage whole, through region 1's barrier, and is
        // loaded in one go (a second wait on its load path cost 2 % at 16 rows, load-bound).
        constexpr int kFirstRegion = NQ != 0 ? 1 : 0;
        // Regions and chunks unrolled (compile-time chunk offsets): a region's copies issue back to
        // back, with little uniform arithmetic between them (a run-time chunk loop cost ~90 ns per
        // chunk on the refill's path).
        const uint32_t dst = sKV + stage * T::STAGE_BYTES;
        const uint32_t tx_bytes = uint32_t(nbox * PAGE_BOX * 128);
#pragma unroll
        for (int region = kFirstRegion; region < 2; ++region) {
          mbar_wait(empty_bar(stage, region), ((it / T::STAGES) & 1) ^ 1);
          if (lane == 0) {
            const int c_begin = region > kFirstRegion ? T::V_CHUNKS : 0;
#pragma unroll
            for (int c = 0; c < T::CHUNKS; ++c) {
              if (c < c_begin || c >= (region == 0 ? T::V_CHUNKS : T::CHUNKS)) continue;
              mbar_expect_tx(full_bar(stage, c), tx_bytes);
#pragma unroll
              for (int b = 0; b < T::BOXES; ++b)
                if (b < nbox)
                  tma_load_4d(dst + c * T::CHUNK_BYTES + b * PAGE_BOX * 128, &kv_map, full_bar(stage, c), c * 64,
                              hk, box_tok[b], box_blk[b], policy);
            }
          }
          __syncwarp();
        }
      }
    }
    return;
  }

  // ================= consumer warpgroups ======================================================
  setmaxnreg_inc<T::CONSUMER_REGS>();
  if constexpr (NQ != 0) {
    consume_transposed<Elem, D, DV, PAGE_BOX, NQ>(p, sQ, sKV, sP, bars,
                                                  reinterpret_cast<float*>(smem_raw + (sQ + NQ * 128 - raw_addr)),
                                                  begin_req, end_req, begin_split, hk, token_range);
    return;
  }
  // The role as a constant of each instantiation: a consumer index ptxas cannot prove
  // warp-uniform among wgmma operands makes it serialize every wgmma (C7520).
  const int cw = __shfl_sync(0xffffffffu, (warp >> 2) - 1, 0);
  if (cw == 0) {
    consume_pairs<Elem, D, DV, PAGE_BOX, 0>(p, sQ, sKV, sP, bars, sRef, sSum, row0, hk,
                                            token_range);
  } else {
    consume_pairs<Elem, D, DV, PAGE_BOX, 1>(p, sQ, sKV, sP, bars, sRef, sSum, row0, hk,
                                            token_range);
  }
}

}  // namespace sm90
}  // namespace mla
