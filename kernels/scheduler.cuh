// Tile scheduler: splits the KV work of a batch across num_sm_parts persistent decode CTAs
// (FlashMLA's greedy scheme, mirrored exactly by mla_cupy/scheduler.py).
//
// Grid (1), block (32): one warp. Cost of a request = ceil(seqlen / 64) blocks + 5 fixed blocks;
// each part takes a payload of P = max(ceil(total / parts) + 5, 10) blocks, or the smaller
// max(ceil(blocks / parts) + 5, 10) where its walk places every request (where requests are
// split over many parts: small batches), then the chosen payload's larger step, X + (X >> 6),
// where that at least halves the splits; a request that does not fit is split at a block
// boundary. Lanes 0-3 walk the candidates at once (lane 0 writing the schedule at one of
// them), and lane 0 writes it again where another is chosen.
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
  int work = 0;
  for (int i = lane; i < p.batch; i += 32) {
    const int blocks = ceil_div(p.seqlens[i], B);
    if (i < kMetadataSmemRequests) blocks_smem[i] = blocks;
    work += blocks;
  }
  for (int off = 16; off >= 1; off >>= 1) work += __shfl_xor_sync(0xffffffffu, work, off);
  const int total = work + F * p.batch;
  __syncwarp();
  auto blocks_of = [&](int i) { return i < kMetadataSmemRequests ? blocks_smem[i] : ceil_div(p.seqlens[i], B); };

  // The greedy walk at `payload`: returns its number of splits, sets `placed` to the requests it
  // placed and, with `write`, fills the schedule rows (but for the split flags) and num_splits.
  auto walk = [&](int payload, bool write, int& placed) {
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
    placed = now_req;
    return splits;
  };
  // The candidates: P, the smaller payload and each one's larger step. The smaller one is
  // walked only where the requests can fit in it: each request takes at least
  // ceil(blocks / (low - F)) pieces, each piece pays F, and the parts hold parts x low. Lane 0
  // writes the schedule at the likelier choice (the smaller payload where it is walked, else
  // P) while lanes 1-3 count splits and placed requests at the others; lane 0 writes it again
  // where the choice (as scheduler.choose_payload) is another one.
  const unsigned all = 0xffffffffu;
  const int base_payload = max(ceil_div(total, p.num_sm_parts) + F, 2 * F);
  const int low_payload = max(ceil_div(work, p.num_sm_parts) + F, 2 * F);
  const int low_room = low_payload - F;  // blocks a piece can take there (0 only if F = 0, no work)
  bool try_low = false;
  if (low_payload < base_payload && low_room > 0) {
    int pieces = 0;
    for (int i = lane; i < p.batch; i += 32) pieces += max(ceil_div(blocks_of(i), low_room), 1);
    for (int off = 16; off >= 1; off >>= 1) pieces += __shfl_xor_sync(all, pieces, off);
    try_low = (long long)work + (long long)F * pieces <= (long long)p.num_sm_parts * low_payload;
  }
  const int first_try = try_low ? low_payload : base_payload;  // lane 0's, written
  const int second = try_low ? base_payload : 0;
  // A larger step is walked only where it is larger (below 64 blocks it is the payload itself).
  auto step_of = [](int payload) {
    const int step = payload >> kSchedPayloadStepShift;
    return step > 0 ? payload + step : 0;
  };
  int payload = 0;
  if (lane == 0) payload = first_try;
  if (lane == 1) payload = step_of(first_try);
  if (lane == 2) payload = second;
  if (lane == 3) payload = step_of(second);
  int splits = 0, placed = 0;
  if (payload > 0) splits = walk(payload, lane == 0, placed);
  // The choice, from the lanes' results by shuffles: the smaller payload where it places every
  // request, else P (lanes 0 and 1, or 2 and 3); then its larger step where that one places
  // every request and at least halves the splits.
  const int low_placed = __shfl_sync(all, placed, 0);  // (lane 0 walked low where try_low)
  const int first = try_low && low_placed != p.batch ? 2 : 0;
  const int first_payload = __shfl_sync(all, payload, first), first_splits = __shfl_sync(all, splits, first);
  const int step_payload = __shfl_sync(all, payload, first + 1), step_splits = __shfl_sync(all, splits, first + 1);
  const int step_placed = __shfl_sync(all, placed, first + 1);
  const bool step = step_payload > first_payload && first_splits > 0 && step_placed == p.batch &&
                    2 * step_splits <= first_splits;
  const int chosen = step ? step_payload : first_payload;
  if (lane == 0 && chosen != first_try) walk(chosen, true, placed);
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
