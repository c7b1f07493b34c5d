"""A DeepSeek-V3-shaped decode step in CuPy: absorbed MLA in every layer over a paged KV cache,
with a page allocator, the whole step captured once as a CUDA graph and replayed.

One layer, for each new token (random weights of DeepSeek-V3's shapes; the MoE / MLP half of
the layer, the embedding and the LM head are left out):

* RMSNorm of the hidden state (7168 wide);
* q path: q_a projection to q_lora_rank 1536, RMSNorm, q_b projection to 128 heads of 128 "nope"
  plus 64 rope dims; per head the nope part is absorbed into the latent space,
  q_latent = q_nope . W_UK (128 -> 512); RoPE on the 64 rope dims;
* kv path: kv_a projection to 512 latent plus 64 rope dims, RMSNorm on the latent, RoPE on the
  rope part; that 576-wide row is written into the layer's paged KV cache (bfloat16, pages of 64
  tokens) at the token's slot;
* attention: ``mla_cupy.flash_mla_with_kvcache`` with q = [q_latent, q_rope] (head dim 576, the
  values are the first 512 columns), causal, softmax_scale 1/sqrt(192) (qk_head_dim 128 + 64);
* output: per head W_UV (512 -> 128), then W_O (128 heads x 128 -> 7168), added to the residual.

A decode step is ``get_mla_metadata`` once, then every layer. The batch's sequences live in a
page allocator: a free list of pages and one block-table row per sequence; each step appends
the new tokens (a new page whenever a sequence crosses a page boundary), and a finished
sequence's pages go back to the free list while a new sequence takes its batch slot. The step
runs eagerly once (on the capture stream, which compiles every kernel), is captured once as a
CUDA graph, then runs for ``--steps`` steps eagerly and ``--steps`` steps as graph replays, the
block table, lengths and new hidden states written in place between steps. It prints the time
per step of both, checks the last layer of the last replayed step (the q and KV rows it wrote
against a host recomputation, its attention against the float64 reference
``mla_cupy.reference``, its output projection against the host), and ends with a line starting
with ``OK``.

Weights and KV caches are bfloat16, activations float32. The projections are a small matrix
kernel of this example's own (compiled by NVRTC through CuPy, like mla_cupy's): cupy.matmul
calls cuBLAS, which CuPy refuses inside a stream capture. Simplifications: RoPE is the plain
rotate-half form with theta 10000 (DeepSeek-V3 extends it with YaRN and folds YaRN's mscale
into the softmax scale; neither changes a shape); a new sequence's prompt rows are whatever its
pages hold (a stand-in for prefill).

The defaults are small enough for a quick run: ``--scale 4`` divides the hidden size,
q_lora_rank and the head count by 4 (61 layers of hidden 1792, 32 heads; about 3 GiB of GPU
memory). The true DeepSeek-V3 size (61 layers, hidden 7168, 128 heads; about 23 GiB with 8
sequences of up to 2K tokens, about 31 GiB with 32 sequences of up to 4K tokens and MTP):

    python examples/deepseek_v3_decode.py --scale 1
    python examples/deepseek_v3_decode.py --scale 1 --mtp --batch 32 --context 4096

Flags: ``--layers N`` (default 61), ``--scale {1,2,4,8,16}`` (default 4), ``--batch B`` (default
8), ``--context T`` (longest prompt, default 2048), ``--steps N`` (eager and replayed steps
timed, default 8), ``--mtp`` (two query tokens per sequence per step, as with DeepSeek-V3's
multi-token prediction), ``--seed S``.

    python examples/deepseek_v3_decode.py
"""

import argparse
import collections
import sys
import time

import numpy as np

from mla_cupy import flash_mla_with_kvcache, get_mla_metadata
from mla_cupy.testing import gpu_status

# DeepSeek-V3's attention sizes. --scale divides the first three; the others are the kernel's
# head dims (576 = 512 latent + 64 rope; values: the first 512) and stay as they are.
HIDDEN, Q_LORA_RANK, HEADS = 7168, 1536, 128
KV_LORA_RANK, ROPE_DIM, NOPE_DIM, V_HEAD_DIM = 512, 64, 128, 128
HEAD_DIM = KV_LORA_RANK + ROPE_DIM
PAGE = 64
ROPE_THETA = 10000.0
RMS_EPS = 1e-6
SOFTMAX_SCALE = (NOPE_DIM + ROPE_DIM) ** -0.5
# Largest relative error (max |error| / max |value|) allowed where the device's float16 and
# bfloat16 arithmetic is compared with the host's float32 (a wrong layout is off by ~100 %).
HOST_RTOL = 2e-2

# The example's own kernels (compiled by NVRTC through CuPy). The projections cannot use
# cupy.matmul: it calls cuBLAS, which CuPy refuses inside a stream capture. ``linear`` is a plain
# matrix product for the few rows of a decode step: bfloat16 weights, float32 activations.
# The others convert float32 <-> bfloat16 (bit patterns in uint16; round to nearest even) and
# write the new tokens' rows into the paged KV cache.
KERNELS = r"""
#define ROW %(row)d
#define PAGE %(page)d
#define LIN_TOKENS 16
#define LIN_COLS 64
#define LIN_WARPS 8
#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); \
         i += (long long)gridDim.x * blockDim.x)

__device__ __forceinline__ unsigned short bf16_bits(float f) {
    unsigned int u = __float_as_uint(f);
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// y[i] = bfloat16(x[i])
extern "C" __global__ void f32_to_bf16(const float* x, unsigned short* y, long long n) {
    GRID_STRIDE(i, n) y[i] = bf16_bits(x[i]);
}

// y[i] = float(x[i]), x bfloat16
extern "C" __global__ void bf16_to_f32(const unsigned short* x, float* y, long long n) {
    GRID_STRIDE(i, n) y[i] = __uint_as_float((unsigned int)x[i] << 16);
}

// rows [batch * s_q, ROW] float32: token j of sequence s sits at position
// seqlens[s] - s_q + j, in page block_table[s, pos / PAGE] of cache [pages, PAGE, 1, ROW]
// (bfloat16), slot pos %% PAGE.
extern "C" __global__ void write_kv(const float* rows, const int* block_table,
                                    const int* seqlens, unsigned short* cache, int batch,
                                    int s_q, int max_pages) {
    GRID_STRIDE(i, (long long)batch * s_q * ROW) {
        int c = (int)(i %% ROW), token = (int)(i / ROW);
        int s = token / s_q;
        int pos = seqlens[s] - s_q + token %% s_q;
        long long page = block_table[(long long)s * max_pages + pos / PAGE];
        cache[(page * PAGE + pos %% PAGE) * ROW + c] = bf16_bits(rows[i]);
    }
}

// y[z, t, :] = x[z, t, :] . w[z] for t < tokens: x float32 at x + z * x_zs + t * x_ts (K
// values, 16-byte aligned), w bfloat16 [Z, K, M] contiguous (M even), y float32 at
// y + z * y_zs + t * y_ts (M values). A block computes LIN_COLS columns of LIN_TOKENS tokens of
// one z over its share of K (blockIdx.z = z * k_split + share), split again over its warps
// and summed in shared memory; with k_split > 1 the shares are added into y (zeroed first).
extern "C" __global__ void __launch_bounds__(LIN_WARPS * 32) linear(
        const float* __restrict__ x, const unsigned int* __restrict__ w, float* y, int tokens,
        int K, int M, long long x_zs, long long x_ts, long long y_zs, long long y_ts,
        int k_split) {
    __shared__ float partial[LIN_WARPS][LIN_TOKENS][LIN_COLS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int z = blockIdx.z / k_split, share = blockIdx.z %% k_split;
    const int col = blockIdx.x * LIN_COLS + 2 * lane;  // this lane's two columns
    const int t0 = blockIdx.y * LIN_TOKENS, nt = min(LIN_TOKENS, tokens - t0);
    const int per_share = (K + k_split * LIN_WARPS * 4 - 1) / (k_split * LIN_WARPS * 4)
                          * LIN_WARPS * 4;
    const int per_warp = per_share / LIN_WARPS;  // a multiple of 4
    const int k_begin = share * per_share + warp * per_warp;
    const int k_end = min(min(K, (share + 1) * per_share), k_begin + per_warp);
    const float* xz = x + z * x_zs + t0 * x_ts;
    const unsigned int* wz = w + ((long long)z * K * M + col) / 2;  // two bfloat16 per word
    float acc0[LIN_TOKENS], acc1[LIN_TOKENS];
#pragma unroll
    for (int t = 0; t < LIN_TOKENS; ++t) acc0[t] = acc1[t] = 0.f;
    if (col < M) {
#pragma unroll 2
        for (int k = k_begin; k < k_end; k += 4) {
            float lo[4], hi[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                unsigned int v = wz[(long long)(k + j) * (M / 2)];
                lo[j] = __uint_as_float(v << 16);
                hi[j] = __uint_as_float(v & 0xFFFF0000u);
            }
#pragma unroll
            for (int t = 0; t < LIN_TOKENS; ++t) {
                if (t < nt) {
                    float4 a = *reinterpret_cast<const float4*>(xz + t * x_ts + k);
                    acc0[t] += a.x * lo[0] + a.y * lo[1] + a.z * lo[2] + a.w * lo[3];
                    acc1[t] += a.x * hi[0] + a.y * hi[1] + a.z * hi[2] + a.w * hi[3];
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < LIN_TOKENS; ++t) {
        partial[warp][t][2 * lane] = acc0[t];
        partial[warp][t][2 * lane + 1] = acc1[t];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < LIN_TOKENS * LIN_COLS; i += blockDim.x) {
        int t = i / LIN_COLS, c = blockIdx.x * LIN_COLS + i %% LIN_COLS;
        if (t < nt && c < M) {
            float sum = 0.f;
#pragma unroll
            for (int v = 0; v < LIN_WARPS; ++v) sum += partial[v][t][i %% LIN_COLS];
            float* out = y + z * y_zs + (t0 + t) * y_ts + c;
            if (k_split == 1) *out = sum; else atomicAdd(out, sum);
        }
    }
}
""" % {"row": HEAD_DIM, "page": PAGE}
LIN_TOKENS, LIN_COLS = 16, 64


def why_no_gpu():
    """None when CuPy sees a CUDA GPU mla_cupy supports, else the reason it does not (no CuPy,
    no NVIDIA driver or GPU, a driver too old for CuPy, a GPU older than compute capability 8.0)."""
    ok, reason = gpu_status()
    return None if ok else reason


def parse_args(argv=None, doc=__doc__, steps_help="steps timed eagerly, then as graph replays"):
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=61, help="decoder layers (DeepSeek-V3: 61)")
    parser.add_argument("--scale", type=int, default=4, choices=(1, 2, 4, 8, 16),
                        help="divide hidden size, q_lora_rank and heads by this (1: true size)")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--context", type=int, default=2048, help="longest prompt, in tokens")
    parser.add_argument("--steps", type=int, default=8, help=steps_help)
    parser.add_argument("--mtp", action="store_true",
                        help="two query tokens per sequence per step (s_q = 2)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    for name in ("layers", "batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.context < 4:
        parser.error("--context must be at least 4")
    return args


# ---------------------------------------------------------------------------------------------
# The page allocator (host side).


class PageAllocator:
    """Pages of PAGE tokens handed out to sequences from a free list.

    Every layer has its own KV cache of ``num_pages`` pages; a sequence's page ``p`` is block
    ``p`` of each of them, so one block table serves every layer. Row ``slot`` of
    ``block_table`` lists, in order, the pages of the sequence in batch slot ``slot`` (-1 past
    its last page: never read); ``seqlens[slot]`` is its length in tokens.
    """

    def __init__(self, num_pages, batch, max_pages_per_seq, rng):
        self.free = collections.deque(int(p) for p in rng.permutation(num_pages))
        self.block_table = np.full((batch, max_pages_per_seq), -1, dtype=np.int32)
        self.seqlens = np.zeros(batch, dtype=np.int32)
        self.allocated = self.freed = 0

    def pages_of(self, slot):
        return -(-int(self.seqlens[slot]) // PAGE)

    def append(self, slot, tokens):
        """Make room for ``tokens`` more tokens of slot ``slot``'s sequence, taking a page from
        the free list each time it crosses a page boundary."""
        length = int(self.seqlens[slot]) + tokens
        need = -(-length // PAGE)
        if need > self.block_table.shape[1]:
            raise RuntimeError(f"a sequence of {length} tokens needs {need} pages; the block "
                               f"table has {self.block_table.shape[1]} columns")
        for j in range(self.pages_of(slot), need):
            if not self.free:
                raise RuntimeError("the page pool is exhausted")
            self.block_table[slot, j] = self.free.popleft()
            self.allocated += 1
        self.seqlens[slot] = length

    def release(self, slot):
        """Give a finished sequence's pages back to the free list; the slot is empty again."""
        pages = self.pages_of(slot)
        self.free.extend(int(p) for p in self.block_table[slot, :pages])
        self.freed += pages
        self.block_table[slot] = -1
        self.seqlens[slot] = 0


class Sequences:
    """One sequence per batch slot, each with a prompt and a length at which it finishes; a
    finished sequence is replaced by a new one, so the batch (the graph's shape) stays full."""

    def __init__(self, allocator, rng, context, max_new_tokens):
        self.alloc, self.rng = allocator, rng
        self.context, self.max_new_tokens = context, max_new_tokens
        self.finish_at = np.zeros(len(allocator.seqlens), dtype=np.int64)
        self.finished = 0
        for slot in range(len(self.finish_at)):
            self.start(slot)

    def start(self, slot):
        prompt = int(self.rng.integers(self.context // 4, self.context + 1))
        self.alloc.append(slot, prompt)  # prefill stand-in: the prompt's rows are left as they are
        self.finish_at[slot] = prompt + int(self.rng.integers(1, self.max_new_tokens + 1))

    def before_step(self, s_q):
        for slot in range(len(self.finish_at)):
            self.alloc.append(slot, s_q)

    def after_step(self):
        for slot in np.flatnonzero(self.alloc.seqlens >= self.finish_at):
            self.alloc.release(slot)
            self.finished += 1
            self.start(slot)


# ---------------------------------------------------------------------------------------------
# The model (device side).


def rms_norm(xp, x, weight):
    x = x.astype(xp.float32)
    return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * weight


def rope(xp, x, cos, sin):
    """Rotate-half RoPE on the last axis (ROPE_DIM wide) of ``x``, in float32."""
    x = x.astype(xp.float32)
    x1, x2 = x[..., : ROPE_DIM // 2], x[..., ROPE_DIM // 2:]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def inverse_frequencies(xp):
    return 1.0 / ROPE_THETA ** (xp.arange(0, ROPE_DIM, 2, dtype=xp.float64) / ROPE_DIM)


class Model:
    """Weights, KV caches and the buffers a decode step reads and writes, all allocated once
    (a CUDA graph replays on fixed addresses). Weights and caches are bfloat16, activations
    float32."""

    def __init__(self, cp, args, num_pages, max_pages_per_seq, seed):
        from ml_dtypes import bfloat16

        self.cp = cp
        self.layers, self.batch = args.layers, args.batch
        self.s_q = 2 if args.mtp else 1
        self.hidden = HIDDEN // args.scale
        self.q_lora_rank = Q_LORA_RANK // args.scale
        self.heads = HEADS // args.scale
        self.tokens = self.batch * self.s_q
        self.max_pages = max_pages_per_seq
        self.check_layer = self.layers - 1
        f32, self.bf16 = cp.float32, np.dtype(bfloat16)
        H, R, h, N = self.hidden, self.q_lora_rank, self.heads, self.tokens

        module = cp.RawModule(code=KERNELS)
        self.kernels = {name: module.get_function(name) for name in
                        ("f32_to_bf16", "bf16_to_f32", "write_kv", "linear")}
        self.sms = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["multiProcessorCount"]
        rs = cp.random.RandomState(seed)

        def weight(shape, fan_in):  # std 1/sqrt(fan_in): activations stay of order 1
            return self.to_bf16(rs.standard_normal(shape, dtype=f32) * fan_in ** -0.5)

        def norm_weight(n):
            return 1 + 0.1 * rs.standard_normal(n, dtype=f32)

        self.weights = [{
            "attn_norm": norm_weight(H),
            "wq_a": weight((H, R), H),
            "q_a_norm": norm_weight(R),
            "wq_b": weight((R, h * (NOPE_DIM + ROPE_DIM)), R),  # per head: [nope, rope]
            "wkv_a": weight((H, HEAD_DIM), H),  # [latent, rope]
            "kv_a_norm": norm_weight(KV_LORA_RANK),
            "w_uk": weight((h, NOPE_DIM, KV_LORA_RANK), NOPE_DIM),
            "w_uv": weight((h, KV_LORA_RANK, V_HEAD_DIM), KV_LORA_RANK),
            "wo": weight((h * V_HEAD_DIM, H), h * V_HEAD_DIM),
        } for _ in range(self.layers)]
        # One paged KV cache per layer, filled with random rows (the prompts' stand-in).
        self.caches = [self.to_bf16(rs.standard_normal((num_pages, PAGE, 1, HEAD_DIM), dtype=f32))
                       for _ in range(self.layers)]
        # Per layer: the q rows handed to the attention, its out and lse.
        self.qs = [cp.empty((self.batch, self.s_q, h, HEAD_DIM), dtype=self.bf16)
                   for _ in range(self.layers)]
        self.outs = [cp.empty((self.batch, self.s_q, h, KV_LORA_RANK), dtype=self.bf16)
                     for _ in range(self.layers)]
        self.lses = [cp.empty((self.batch, h, self.s_q), dtype=f32) for _ in range(self.layers)]
        # Step inputs, written in place before every step.
        self.block_table = cp.full((self.batch, max_pages_per_seq), -1, dtype=cp.int32)
        self.seqlens = cp.zeros(self.batch, dtype=cp.int32)
        self.embed = cp.zeros((N, H), dtype=f32)  # the new tokens' hidden states
        # Step state and outputs: the hidden state, and the checked layer's input and output.
        self.hidden_state = cp.zeros((N, H), dtype=f32)
        self.check_input = cp.zeros((N, H), dtype=f32)
        self.check_output = cp.zeros((N, H), dtype=f32)
        self.q_offsets = cp.arange(self.s_q, dtype=cp.int32)
        self.inv_freq = inverse_frequencies(cp)
        self.rs = rs

    def _launch(self, name, n, *args):
        blocks = max(1, min(-(-n // 256), 16384))
        self.kernels[name]((blocks,), (256,), args)

    def to_bf16(self, x):
        """A new bfloat16 array holding float32 ``x`` rounded."""
        y = self.cp.empty(x.shape, dtype=self.bf16)
        self._launch("f32_to_bf16", x.size, self.cp.ascontiguousarray(x, dtype=self.cp.float32),
                     y, np.int64(x.size))
        return y

    def linear(self, x, w, y):
        """``y[z] = x[z] @ w[z]`` for float32 ``x`` [Z, tokens, K] and ``y`` [Z, tokens, M]
        (views, unit stride in their last axis) and bfloat16 ``w`` [Z, K, M] (contiguous); 2-D
        arguments mean Z = 1."""
        cp = self.cp
        result = y
        if w.ndim == 2:
            x, w, y = x[None], w[None], y[None]
        (Z, N, K), M = x.shape, w.shape[2]
        if w.shape != (Z, K, M) or y.shape != (Z, N, M) or not w.flags.c_contiguous:
            raise ValueError(f"linear: x {x.shape}, w {w.shape}, y {y.shape}")
        if (x.dtype != cp.float32 or y.dtype != cp.float32 or w.dtype != self.bf16 or K % 4
                or M % 2 or x.strides[2] != 4 or y.strides[2] != 4 or x.data.ptr % 16
                or x.strides[0] % 16 or x.strides[1] % 16):
            raise ValueError("linear: float32 x rows 16-byte aligned, K % 4 == 0, M even, "
                             "unit stride in the last axis")
        blocks = -(-M // LIN_COLS) * -(-N // LIN_TOKENS) * Z
        k_split = max(1, min(K // 256, -(-2 * self.sms // blocks)))  # fill the GPU twice over
        if k_split > 1:
            y.fill(0)  # the K shares are added into it
        self.kernels["linear"](
            (-(-M // LIN_COLS), -(-N // LIN_TOKENS), Z * k_split), (256,),
            (x, w, y, np.int32(N), np.int32(K), np.int32(M),
             np.int64(x.strides[0] // 4), np.int64(x.strides[1] // 4),
             np.int64(y.strides[0] // 4), np.int64(y.strides[1] // 4), np.int32(k_split)))
        return result

    def new_inputs(self, allocator):
        """Write the next step's block table, lengths and hidden states in place."""
        cp = self.cp
        self.block_table.set(allocator.block_table)
        self.seqlens.set(allocator.seqlens)
        cp.copyto(self.embed, self.rs.standard_normal(self.embed.shape, dtype=cp.float32))

    def step(self):
        """One decode step: the tile schedule once, then every layer. No host sync, no host
        read of device data and no cuBLAS, so it can be captured in a CUDA graph."""
        cp = self.cp
        schedule = get_mla_metadata(self.seqlens, self.s_q * self.heads, 1)
        # Position of each new token (token t = sequence * s_q + j): seqlen - s_q + j.
        pos = (self.seqlens[:, None] - self.s_q + self.q_offsets[None, :]).reshape(-1)
        angle = pos[:, None].astype(cp.float64) * self.inv_freq[None, :]
        cos, sin = cp.cos(angle).astype(cp.float32), cp.sin(angle).astype(cp.float32)
        cp.copyto(self.hidden_state, self.embed)
        for layer in range(self.layers):
            if layer == self.check_layer:
                cp.copyto(self.check_input, self.hidden_state)
            y = self.layer(layer, self.hidden_state, cos, sin, schedule)
            if layer == self.check_layer:
                cp.copyto(self.check_output, y)
            self.hidden_state += y

    def layer(self, index, x, cos, sin, schedule):
        """Absorbed MLA attention of layer ``index`` on hidden states ``x`` [tokens, hidden];
        returns what it adds to the residual, [tokens, hidden] (float32 both)."""
        cp = self.cp
        w = self.weights[index]
        N, H, R, h = self.tokens, self.hidden, self.q_lora_rank, self.heads
        f32 = cp.float32
        xn = rms_norm(cp, x, w["attn_norm"])                                          # [N, H]
        cq = rms_norm(cp, self.linear(xn, w["wq_a"], cp.empty((N, R), f32)), w["q_a_norm"])
        q = self.linear(cq, w["wq_b"], cp.empty((N, h * (NOPE_DIM + ROPE_DIM)), f32))
        q = q.reshape(N, h, NOPE_DIM + ROPE_DIM)                                     # [N, h, 192]
        # q rows [N, h, 576] = [q_nope . W_UK per head, RoPE(q_rope)], then bfloat16.
        q_rows = cp.empty((N, h, HEAD_DIM), f32)
        self.linear(q[:, :, :NOPE_DIM].transpose(1, 0, 2), w["w_uk"],
                    q_rows[:, :, :KV_LORA_RANK].transpose(1, 0, 2))
        q_rows[:, :, KV_LORA_RANK:] = rope(cp, q[:, :, NOPE_DIM:], cos[:, None, :],
                                           sin[:, None, :])
        self._launch("f32_to_bf16", q_rows.size, q_rows, self.qs[index], np.int64(q_rows.size))
        # KV rows [N, 576] = [RMSNorm(latent), RoPE(rope)], written at the new tokens' slots.
        kv = self.linear(xn, w["wkv_a"], cp.empty((N, HEAD_DIM), f32))
        rows = cp.concatenate([rms_norm(cp, kv[:, :KV_LORA_RANK], w["kv_a_norm"]),
                               rope(cp, kv[:, KV_LORA_RANK:], cos, sin)], axis=1)
        self._launch("write_kv", N * HEAD_DIM, rows, self.block_table, self.seqlens,
                     self.caches[index], np.int32(self.batch), np.int32(self.s_q),
                     np.int32(self.max_pages))
        flash_mla_with_kvcache(self.qs[index], self.caches[index], self.block_table,
                               self.seqlens, KV_LORA_RANK, *schedule,
                               softmax_scale=SOFTMAX_SCALE, causal=True,
                               out=self.outs[index], lse=self.lses[index])
        # Output: per head W_UV (512 -> 128), then W_O.
        o = cp.empty((N, h, KV_LORA_RANK), f32)
        self._launch("bf16_to_f32", o.size, self.outs[index], o, np.int64(o.size))
        v = cp.empty((N, h, V_HEAD_DIM), f32)
        self.linear(o.transpose(1, 0, 2), w["w_uv"], v.transpose(1, 0, 2))
        return self.linear(v.reshape(N, h * V_HEAD_DIM), w["wo"], cp.empty((N, H), f32))

    def gib(self):
        """(weights, KV caches) in GiB."""
        weights = sum(a.nbytes for layer in self.weights for a in layer.values())
        return weights / 2**30, sum(c.nbytes for c in self.caches) / 2**30


def estimated_bytes(args, num_pages):
    H, R, h = HIDDEN // args.scale, Q_LORA_RANK // args.scale, HEADS // args.scale
    weights = 2 * (H * R + R * h * (NOPE_DIM + ROPE_DIM) + H * HEAD_DIM
                   + h * NOPE_DIM * KV_LORA_RANK + h * KV_LORA_RANK * V_HEAD_DIM
                   + h * V_HEAD_DIM * H)
    cache = 2 * num_pages * PAGE * HEAD_DIM
    largest_temporary = 4 * max(h * V_HEAD_DIM * H, num_pages * PAGE * HEAD_DIM)
    return args.layers * (weights + cache) + largest_temporary


# ---------------------------------------------------------------------------------------------
# The checks of one layer of one step, on the host.


def relative_error(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def check_layer(index, weights, x, q, cache, out, lse, y, block_table, seqlens):
    """Check layer ``index`` of the step just run, from host (NumPy) copies of its weights (a
    dict), its input hidden states ``x`` [tokens, hidden], the q rows ``q`` [batch, s_q, heads,
    576] and the KV cache ``cache`` it wrote, its attention's ``out`` and ``lse``, and ``y``,
    what it added to the residual; ``block_table`` and ``seqlens`` are the step's. The q rows,
    the KV rows at the new tokens' slots and ``y`` are compared with the host's float32
    computation, the attention with the float64 reference. Returns the attention's
    CompareReport and the three relative errors; raises AssertionError where one is off."""
    from mla_cupy.reference import flash_mla_with_kvcache_reference
    from mla_cupy.testing import assert_mla_close

    w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    batch, s_q, h, _ = q.shape
    N = batch * s_q
    pos = (seqlens[:, None].astype(np.int64) - s_q + np.arange(s_q)).reshape(-1)
    angle = pos[:, None] * inverse_frequencies(np)
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)

    xn = rms_norm(np, np.asarray(x, dtype=np.float32), w["attn_norm"])
    cq = rms_norm(np, xn @ w["wq_a"], w["q_a_norm"])
    qh = (cq @ w["wq_b"]).reshape(N, h, NOPE_DIM + ROPE_DIM)
    q_want = np.concatenate([np.einsum("thn,hnc->thc", qh[:, :, :NOPE_DIM], w["w_uk"]),
                             rope(np, qh[:, :, NOPE_DIM:], cos[:, None, :], sin[:, None, :])],
                            axis=-1)
    kv = xn @ w["wkv_a"]
    rows_want = np.concatenate([rms_norm(np, kv[:, :KV_LORA_RANK], w["kv_a_norm"]),
                                rope(np, kv[:, KV_LORA_RANK:], cos, sin)], axis=1)
    y_want = np.einsum("thc,hcv->thv", np.asarray(out, dtype=np.float32).reshape(N, h, -1),
                       w["w_uv"]).reshape(N, h * V_HEAD_DIM) @ w["wo"]

    seq = np.arange(N) // s_q
    rows_got = cache[block_table[seq, pos // PAGE], pos % PAGE, 0]
    errors = {"q rows": relative_error(np.asarray(q, dtype=np.float32).reshape(N, h, -1), q_want),
              "KV rows at their slots": relative_error(rows_got.astype(np.float32), rows_want),
              "output projection": relative_error(np.asarray(y, dtype=np.float32), y_want)}
    for what, error in errors.items():
        if not error <= HOST_RTOL:
            raise AssertionError(f"layer {index}, {what}: max |error| vs the host is {error:.2e} "
                                 f"of the largest value (allowed {HOST_RTOL})")

    out_ref, lse_ref = flash_mla_with_kvcache_reference(
        q, cache, block_table, seqlens, KV_LORA_RANK, softmax_scale=SOFTMAX_SCALE, causal=True)
    # The q and KV rows are of order 1 (RMS-normalized, unit-variance weights): std=1.0.
    report = assert_mla_close(out, lse, out_ref, lse_ref, std=1.0,
                              msg=f"layer {index} attention vs the float64 reference")
    return report, errors


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    reason = why_no_gpu()
    if reason is not None:
        print(f"No CUDA GPU available: {reason}. Nothing to run.")
        return 0

    import cupy as cp

    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    s_q = 2 if args.mtp else 1
    executed_steps = 1 + 2 * args.steps  # warm-up, eager, replays (the capture runs nothing)
    max_new_tokens = executed_steps * s_q
    max_pages_per_seq = -(-(args.context + max_new_tokens + s_q) // PAGE)
    num_pages = args.batch * max_pages_per_seq

    need = estimated_bytes(args, num_pages)
    free, _ = cp.cuda.runtime.memGetInfo()
    if need > 0.9 * free:
        print(f"This run needs about {need / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB "
              f"is free: use a larger --scale, fewer --layers or a smaller --batch/--context.")
        return 1

    start_time = time.perf_counter()
    model = Model(cp, args, num_pages, max_pages_per_seq, seed)
    allocator = PageAllocator(num_pages, args.batch, max_pages_per_seq, rng)
    sequences = Sequences(allocator, rng, args.context, max_new_tokens)
    prompt_pages = allocator.allocated
    cp.cuda.Device().synchronize()
    init_s = time.perf_counter() - start_time
    weights_gib, cache_gib = model.gib()
    print(f"DeepSeek-V3 decode, scale 1/{args.scale}: {args.layers} layers, hidden "
          f"{model.hidden}, q_lora_rank {model.q_lora_rank}, {model.heads} heads, batch "
          f"{args.batch}, s_q {s_q}, pages of {PAGE} ({num_pages} in the pool); weights "
          f"{weights_gib:.2f} GiB bfloat16, KV caches {cache_gib:.2f} GiB bfloat16; "
          f"made in {init_s:.1f} s (seed {seed})")

    stream = cp.cuda.Stream(non_blocking=True)
    # Every temporary of the captured step comes from a pool of its own: the graph replays on
    # those addresses, so nothing else may ever be allocated there.
    graph_pool = cp.cuda.MemoryPool()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = {"eager": [], "graph": []}
    with stream:
        sequences.before_step(s_q)
        model.new_inputs(allocator)
        with cp.cuda.using_allocator(graph_pool.malloc):
            t0 = time.perf_counter()
            model.step()  # eager, on the capture stream: compiles and loads every kernel
            stream.synchronize()
            first_step_s = time.perf_counter() - t0
            stream.begin_capture()
            model.step()
            graph = stream.end_capture()
        sequences.after_step()

        for label, run in (("eager", model.step), ("graph", lambda: graph.launch(stream))):
            for _ in range(args.steps):
                sequences.before_step(s_q)
                model.new_inputs(allocator)
                block_table, seqlens = allocator.block_table.copy(), allocator.seqlens.copy()
                start.record(stream)
                run()
                end.record(stream)
                end.synchronize()
                times[label].append(cp.cuda.get_elapsed_time(start, end))
                sequences.after_step()

    # The last step was a replay: check its last layer.
    i = model.check_layer
    report, errors = check_layer(
        i, {k: v.get() for k, v in model.weights[i].items()}, model.check_input.get(),
        model.qs[i].get(), model.caches[i].get(), model.outs[i].get(), model.lses[i].get(),
        model.check_output.get(), block_table, seqlens)
    eager_ms, graph_ms = np.median(times["eager"]), np.median(times["graph"])
    print(f"first step (compiles or loads the kernels) {first_step_s:.2f} s; then per step: "
          f"eager {eager_ms:.2f} ms, CUDA graph {graph_ms:.2f} ms ({eager_ms / graph_ms:.1f}x), "
          f"median of {args.steps}")
    print(f"page allocator: {prompt_pages} pages for the first prompts, "
          f"{allocator.allocated - prompt_pages} more during the run (new pages and new "
          f"sequences), {allocator.freed} freed by {sequences.finished} finished sequences")
    print(f"OK: layer {model.check_layer} of the last replayed step matches: q rows, KV rows at "
          f"their slots and output projection vs the host (relative errors "
          + ", ".join(f"{e:.1e}" for e in errors.values())
          + f"), attention vs the float64 reference (out max |error| "
          f"{report.out_max_abs_error:.2e}, lse max |error| {report.lse_max_abs_error:.2e}); "
          f"{args.layers} layers at {graph_ms:.2f} ms per step as a CUDA graph, "
          f"{eager_ms:.2f} ms eager")
    return 0


if __name__ == "__main__":
    sys.exit(main())
