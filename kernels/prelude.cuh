// mla_cupy prelude for NVRTC: fixed-width integers, 16-bit float packing, and thin wrappers
// around the PTX the kernels use (cp.async, ldmatrix, mma.sync, ex2, named barriers).
// No host or CUDA headers are included, so the same text compiles on a machine without a GPU.
#pragma once

typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;

#define MLA_DEVICE __device__ __forceinline__

namespace mla {

constexpr float kLn2 = 0.6931471805599453f;

MLA_DEVICE float neg_inf() { return __int_as_float(0xff800000); }
MLA_DEVICE float pos_inf() { return __int_as_float(0x7f800000); }

// ---- 16-bit element types -------------------------------------------------------------------
// Kernels take the element type as a traits type (Bf16 or Fp16); the low-level helpers below
// take its kIsBf16. An FP8 cache would add a traits type of its own.
struct Bf16 {
  static constexpr bool kIsBf16 = true;
  static constexpr int kBytes = 2;
};
struct Fp16 {
  static constexpr bool kIsBf16 = false;
  static constexpr int kBytes = 2;
};

// IsBf16 selects bfloat16 (true) or float16 (false) everywhere a kernel touches element bits.
template <bool IsBf16>
MLA_DEVICE uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (IsBf16) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

MLA_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---- programmatic dependent launch (sm_90 and later; no-ops before) ---------------------------
// A kernel launched with programmatic stream serialization may start while the kernel before it
// on the stream still runs: it must call pdl_wait() before touching anything that kernel writes
// (the wait returns once it has completed and its writes are visible; at once when the launch
// was an ordinary one). pdl_launch_dependents() lets such a follower be scheduled as soon as
// every CTA of this grid has called it or exited.
MLA_DEVICE void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
MLA_DEVICE void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" :::);
#endif
}

// ---- shared memory and asynchronous copies --------------------------------------------------
MLA_DEVICE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy that bypasses L1; src_bytes = 0 zero-fills without reading.
MLA_DEVICE void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
MLA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
MLA_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

MLA_DEVICE void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
MLA_DEVICE void ldmatrix_x2(uint32_t addr, uint32_t& r0, uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r0), "=r"(r1) : "r"(addr));
}
MLA_DEVICE void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// D(16x8, f32) += A(16x16, row) * B(16x8, col), 16-bit inputs.
template <bool IsBf16>
MLA_DEVICE void mma_16816(float* d, const uint32_t* a, const uint32_t* b) {
  if constexpr (IsBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Named barrier over `count` threads (a multiple of 32); id 0 is __syncthreads'.
MLA_DEVICE void named_barrier(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// Arrive at named barrier `id` of COUNT threads without waiting (the others sync on it).
template <int COUNT>
MLA_DEVICE void named_barrier_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(COUNT) : "memory");
}

MLA_DEVICE uint32_t dynamic_smem_bytes() {
  uint32_t r;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
}

MLA_DEVICE void store_u32(void* p, uint32_t v) { *reinterpret_cast<uint32_t*>(p) = v; }

}  // namespace mla
