// Tile scheduler: splits the KV work of a batch across num_sm_parts persistent decode CTAs
// (FlashMLA's greedy scheme, mirrored exactly by mla_cupy/scheduler.py).
//
// Grid (1), block (32): one warp. Cost of a request = ceil(seqlen / 64) blocks + 5 fixed blocks;
// each part takes a payload of P = max(ceil(total / parts) + 5, 10) blocks, or P + (P >> 6)
// where that at least halves the splits (lane 0 writes the schedule at P while lane 1 counts the
// splits at the larger one), and a request that does not fit is split at a block boundary.
// Output per part p (8 int32): begin_req, end_req (inclusive), begin_block, end_block (64-token
// blocks of the first / last request; the last one ends at min(end_block * 64, seqlen)),
// begin_split_idx, is_first_req_split, is_last_req_split, 0.
// num_splits[b + 1] are prefix sums of the number of splits of each request. Runs entirely on
// the GPU, reading cache_seqlens from device memory: no host sync, safe to capture in a graph.
#pragma once

namespace mla {

MLA_DEVICE int ceil_div(int a, int b) { return (a + b - 1) / b; }

constexpr int kMetadataThreads = 32;  // one warp
constexpr int kSchedPayloadStepShift = 6;  // the larger candidate payload: P + (P >> 6)

// Requests whose block counts are staged in shared memory; later ones are read from global.
constexpr int kMetadataSmemRequests = 8192;

// The kernel body, shared by metadata_kernel and the flat-argument entry of jax_entry.cuh.
MLA_DEVICE void metadata_body(const MetadataParams& p) {
  __shared__ int blocks_smem[kMetadataSmemRequests];
  const int lane = threadIdx.x;
  const int B = p.block_tokens, F = p.fixed_overhead;
  int total = 0;
  for (int i = lane; i < p.batch; i += 32) {
    const int blocks = ceil_div(p.seqlens[i], B);
    if (i < kMetadataSmemRequests) blocks_smem[i] = blocks;
    total += blocks + F;
  }
  for (int off = 16; off >= 1; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
  __syncwarp();
  auto blocks_of = [&](int i) { return i < kMetadataSmemRequests ? blocks_smem[i] : ceil_div(p.seqlens[i], B); };

  // The greedy walk at `payload`: returns its number of splits and, with `write`, fills the
  // schedule rows (but for the split flags) and num_splits.
  auto walk = [&](int payload, bool write) {
    int now_req = 0, now_block = 0, now_split = 0, cum = 0, splits = 0;
    if (write) p.num_splits[0] = 0;
    for (int part = 0; part < p.num_sm_parts; ++part) {
      int32_t* row = p.sched + part * kSchedMetadataSize;
      if (write) {
        row[0] = now_req;
        row[2] = now_block;
        row[4] = now_split;
      }
      int remain = payload;
      while (now_req < p.batch) {
        const int left = blocks_of(now_req) - now_block;
        if (remain >= left + F) {
          cum += now_split + 1;
          if (write) p.num_splits[now_req + 1] = cum;
          remain -= left + F;
          ++now_req;
          now_block = 0;
          now_split = 0;
        } else {
          if (remain - F > 0) {
            now_block += remain - F;
            ++now_split;
            ++splits;
          }
          break;
        }
      }
      if (write) {
        if (now_block > 0) {
          row[1] = now_req;
          row[3] = now_block;
        } else {
          row[1] = now_req - 1;
          row[3] = now_req > 0 ? blocks_of(now_req - 1) : 0;
        }
      }
    }
    return splits;
  };
  // Lane 0 writes the schedule at P while lane 1 counts the splits at the larger payload (the
  // two walks run at once); where the larger one at least halves the splits, lane 0 writes it
  // over the first.
  const int base_payload = max(ceil_div(total, p.num_sm_parts) + F, 2 * F);
  const int larger = base_payload + (base_payload >> kSchedPayloadStepShift);
  int splits = 0;
  if (lane == 0 || (lane == 1 && larger > base_payload)) splits = walk(lane == 0 ? base_payload : larger, lane == 0);
  const int splits_base = __shfl_sync(0xffffffffu, splits, 0);
  const int splits_larger = __shfl_sync(0xffffffffu, splits, 1);
  if (lane == 0 && larger > base_payload && splits_base > 0 && 2 * splits_larger <= splits_base) walk(larger, true);
  __syncthreads();  // num_splits complete and visible to the whole (one-warp) block

  for (int part = lane; part < p.num_sm_parts; part += 32) {
    int32_t* row = p.sched + part * kSchedMetadataSize;
    const int begin = row[0], end = row[1];
    const bool empty = begin >= p.batch;
    row[5] = empty ? 0 : int(p.num_splits[begin + 1] - p.num_splits[begin] > 1);
    row[6] = empty ? 0 : int(p.num_splits[end + 1] - p.num_splits[end] > 1);
    row[7] = 0;
  }
}

__global__ void __launch_bounds__(kMetadataThreads) metadata_kernel(const __grid_constant__ MetadataParams p) {
  metadata_body(p);
}

}  // namespace mla
