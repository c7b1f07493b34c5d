"""Host twin of the GPU tile scheduler.

The decode kernel runs ``num_sm_parts`` CTAs per (KV head, query-row tile). Each of those
*parts* walks a contiguous range of the batch, measured in 64-token scheduling blocks, and
the scheduler decides where each range starts and ends. The GPU computes the same plan with a
one-warp kernel so that a decode step needs no host round trip; this module is the plain
NumPy statement of that plan. The two must agree bit for bit, and the CPU tests check the
plan's invariants here.

Cost model: a request of ``seqlen`` tokens costs ``ceil(seqlen / B) + F`` blocks, where
``B = SCHED_BLOCK_TOKENS`` and ``F = SCHED_FIXED_OVERHEAD_BLOCKS`` (the fixed price of loading a
request, writing its output and, if split, combining it). The total is shared out greedily, a
payload of blocks per part, and a request that does not fit in what is left of a part is split:
its first blocks stay with this part and the rest open the next one. The payload is
``P = max(ceil(total / num_sm_parts) + F, 2 F)``; where requests are split over many parts
(small batches), the smaller ``max(ceil(blocks / num_sm_parts) + F, 2 F)`` (each part pays F
once) when its walk still places every request, since ``total`` counts F once per request while
a split request pays it once per piece (4 requests of 128 blocks on 66 parts: 9 blocks per part
at ``P``, 58 parts busy; 8 blocks at the smaller one, 64 busy). It is walked only where a lower
bound on the pieces (each request at least ``ceil(blocks / (low - F))``) leaves the batch room
to fit. Then the chosen payload's larger step, ``X + (X >> SCHED_PAYLOAD_STEP_SHIFT)``, where
that slightly larger one at least halves the number of splits: a split costs a partial result
and a merge, and where parts are a sliver short of whole requests (a uniform batch of 128
requests of 64 blocks on 33 parts: three requests and 96 % of a fourth per part at ``P``) the
larger payload removes every split for ~1 % more work per part (measured: 5 % faster).

Layout of one row of ``tile_scheduler_metadata`` (``SCHED_METADATA_SIZE`` int32):

==== =================== ====================================================================
slot name                meaning
==== =================== ====================================================================
0    begin_req           first request of the part (``b`` for an empty part)
1    end_req             last request of the part, inclusive
2    begin_block         first 64-token block of ``begin_req`` handled here
3    end_block           end (exclusive) of the blocks of ``end_req`` handled here
4    begin_split         split index of ``begin_req`` in this part (other requests: 0)
5    is_first_req_split  1 if ``begin_req`` has more than one split in total
6    is_last_req_split   1 if ``end_req`` has more than one split in total
7    (pad)               0
==== =================== ====================================================================

The part covers tokens ``[begin_block * B, ...)`` of ``begin_req``, whole middle requests and
tokens ``[..., min(end_block * B, seqlen))`` of ``end_req``. ``num_splits`` holds prefix sums
of the number of splits per request (``num_splits[0] == 0``): split ``k`` of request ``r`` owns
slot ``num_splits[r] + k`` of the fp32 partial buffers, and a request with exactly one split is
written straight to the output. The total number of splits is at most ``b + num_sm_parts``.
"""

import numpy as np

from .support import (
    SCHED_BLOCK_TOKENS,
    SCHED_FIXED_OVERHEAD_BLOCKS,
    SCHED_METADATA_SIZE,
    SCHED_PAYLOAD_STEP_SHIFT,
)

__all__ = ["num_sm_parts", "schedule"]


def _positive_int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def num_sm_parts(num_sms, num_q_tokens_per_head_k, num_heads_k):
    """Number of scheduler parts per (KV head, query-row tile).

    Parameters
    ----------
    num_sms : int
        Decode CTAs the device runs at once: its SM count times the CTAs per SM of the decode
        kernel (``get_mla_metadata`` passes SMs x the ``ctas_per_sm`` of the configuration
        ``_select`` picks; the portable kernel runs two for query tiles of up to 32 rows on GPUs
        with enough shared memory, else one).
    num_q_tokens_per_head_k : int
        Query rows that share one KV head, ``s_q * h_q // h_kv``.
    num_heads_k : int
        KV heads ``h_kv``.

    Returns
    -------
    int
        ``max(num_sms // num_heads_k // ceil(num_q_tokens_per_head_k / 64), 1)``, so that
        all parts of all KV heads and query tiles fill the device about once.

    Raises
    ------
    TypeError
        If an argument is not an integer.
    ValueError
        If an argument is smaller than 1.
    """
    num_sms = _positive_int(num_sms, "num_sms")
    rows = _positive_int(num_q_tokens_per_head_k, "num_q_tokens_per_head_k")
    heads = _positive_int(num_heads_k, "num_heads_k")
    row_tiles = -(-rows // SCHED_BLOCK_TOKENS)
    return max(num_sms // heads // row_tiles, 1)


def schedule(cache_seqlens, num_sm_parts):
    """Split a batch of KV sequences over ``num_sm_parts`` parts, as the GPU scheduler does.

    Parameters
    ----------
    cache_seqlens : array_like of int, shape (b,)
        Tokens in the KV cache of each request, ``>= 0``; ``b >= 1``. A CuPy array is
        copied to the host.
    num_sm_parts : int
        Number of parts (see :func:`num_sm_parts`).

    Returns
    -------
    tile_scheduler_metadata : numpy.ndarray of int32, shape (num_sm_parts, 8)
        One row per part; the columns are described in the module docstring.
    num_splits : numpy.ndarray of int32, shape (b + 1,)
        Prefix sums of the number of splits of each request, starting at 0.

    Raises
    ------
    TypeError
        If ``num_sm_parts`` is not an integer or ``cache_seqlens`` is not integral.
    ValueError
        If ``cache_seqlens`` is not a non-empty 1-D array of non-negative values, or
        ``num_sm_parts < 1``.
    RuntimeError
        If the parts fail to cover the whole batch (an internal error).
    """
    if hasattr(cache_seqlens, "get") and not isinstance(cache_seqlens, np.ndarray):
        cache_seqlens = cache_seqlens.get()
    seqlens = np.asarray(cache_seqlens)
    if seqlens.dtype.kind not in "iu":
        raise TypeError(f"cache_seqlens must hold integers, got dtype {seqlens.dtype}")
    if seqlens.ndim != 1 or seqlens.shape[0] < 1:
        raise ValueError(
            f"cache_seqlens must be 1-D with at least one entry, got shape {seqlens.shape}")
    if (seqlens < 0).any():
        raise ValueError(f"cache_seqlens must be >= 0, got minimum {int(seqlens.min())}")
    parts = _positive_int(num_sm_parts, "num_sm_parts")

    batch = int(seqlens.shape[0])
    # Python ints: no overflow however long the sequences are.
    blocks = [-(-int(n) // SCHED_BLOCK_TOKENS) for n in seqlens]
    payload = choose_payload(blocks, parts)

    metadata = np.zeros((parts, SCHED_METADATA_SIZE), dtype=np.int32)
    num_splits = np.zeros(batch + 1, dtype=np.int32)
    placed, _ = _walk(blocks, parts, payload, metadata, num_splits)
    if placed != batch:
        raise RuntimeError(
            f"scheduler left requests {placed}..{batch - 1} unassigned "
            f"(num_sm_parts={parts}, payload={payload})")

    # Which requests are split is known only once every part is placed.
    splits = np.diff(num_splits)
    for part in range(parts):
        begin_req, end_req = int(metadata[part, 0]), int(metadata[part, 1])
        if begin_req < batch:
            metadata[part, 5] = int(splits[begin_req] > 1)
            metadata[part, 6] = int(splits[end_req] > 1)
    return metadata, num_splits


def _walk(blocks, parts, payload, metadata=None, num_splits=None):
    """The greedy walk of requests of `blocks` blocks over `parts` parts of `payload` blocks:
    returns (requests placed, splits), and fills columns 0-4 of `metadata` and `num_splits`
    when they are given (the kernel's walk, with and without its writes)."""
    overhead = SCHED_FIXED_OVERHEAD_BLOCKS
    batch = len(blocks)
    now_req = now_block = now_split = cumulative = splits = 0
    for part in range(parts):
        begin_req, begin_block, begin_split = now_req, now_block, now_split
        remain = payload
        while now_req < batch:
            left = blocks[now_req] - now_block
            if remain >= left + overhead:
                # The rest of this request fits: finish it here.
                cumulative += now_split + 1
                if num_splits is not None:
                    num_splits[now_req + 1] = cumulative
                remain -= left + overhead
                now_req += 1
                now_block = 0
                now_split = 0
            else:
                # It does not: take what is left of the payload and split the request.
                if remain - overhead > 0:
                    now_block += remain - overhead
                    now_split += 1
                    splits += 1
                break
        if metadata is not None:
            if now_block > 0:
                end_req, end_block = now_req, now_block
            else:
                end_req, end_block = now_req - 1, blocks[now_req - 1]
            metadata[part, :5] = (begin_req, end_req, begin_block, end_block, begin_split)
    return now_req, splits


def choose_payload(blocks, parts):
    """The payload of each part for requests of `blocks` scheduling blocks over `parts` parts:
    ``P = max(ceil(total / parts) + F, 2 F)``, or the smaller ``max(ceil(sum(blocks) / parts) +
    F, 2 F)`` where the walk at that one places every request; then that payload's larger
    step, ``X + (X >> SCHED_PAYLOAD_STEP_SHIFT)``, where it at least halves the splits of the
    greedy walk (see the module docstring)."""
    overhead = SCHED_FIXED_OVERHEAD_BLOCKS
    batch = len(blocks)
    work = sum(int(b) for b in blocks)
    total = work + overhead * batch
    payload = max(-(-total // parts) + overhead, 2 * overhead)
    # The smaller payload is walked only where the requests can fit in it: each request takes at
    # least ceil(blocks / (low - F)) pieces, each piece pays F, and the parts hold parts * low.
    low = max(-(-work // parts) + overhead, 2 * overhead)
    room = low - overhead
    walked = None  # (placed, splits) of the walk at `payload`, once made
    if low < payload and room > 0:
        pieces = sum(max(-(-int(b) // room), 1) for b in blocks)
        if work + overhead * pieces <= parts * low:
            at_low = _walk(blocks, parts, low)
            if at_low[0] == batch:
                payload, walked = low, at_low
    larger = payload + (payload >> SCHED_PAYLOAD_STEP_SHIFT)
    if larger > payload:
        base = (walked or _walk(blocks, parts, payload))[1]
        if base > 0:
            placed, splits = _walk(blocks, parts, larger)
            if placed == batch and 2 * splits <= base:
                return larger
    return payload
