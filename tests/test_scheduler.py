"""CPU lane: invariants of the host twin of the tile scheduler."""

import numpy as np
import pytest

from mla_cupy.scheduler import choose_payload, num_sm_parts, schedule
from mla_cupy.support import (
    SCHED_BLOCK_TOKENS,
    SCHED_FIXED_OVERHEAD_BLOCKS,
    SCHED_METADATA_SIZE,
    SCHED_PAYLOAD_STEP_SHIFT,
)

pytestmark = pytest.mark.cpu

B = SCHED_BLOCK_TOKENS
F = SCHED_FIXED_OVERHEAD_BLOCKS


def check_schedule(seqlens, parts):
    """Run the scheduler and check every invariant the decode and combine kernels rely on."""
    seqlens = np.asarray(seqlens, dtype=np.int32)
    batch = seqlens.size
    context = f"b={batch} parts={parts} seqlens[:8]={seqlens[:8].tolist()}"
    metadata, num_splits = schedule(seqlens, parts)
    assert metadata.dtype == np.int32 and metadata.shape == (parts, SCHED_METADATA_SIZE)
    assert num_splits.dtype == np.int32 and num_splits.shape == (batch + 1,)

    blocks = -(-seqlens.astype(np.int64) // B)
    total = int(blocks.sum()) + F * batch
    least = max(-(-total // parts) + F, 2 * F)
    low = max(-(-int(blocks.sum()) // parts) + F, 2 * F)  # F once per part
    payload = choose_payload(blocks.tolist(), parts)
    step = SCHED_PAYLOAD_STEP_SHIFT
    assert payload in (least, least + (least >> step), low, low + (low >> step)), context
    splits = np.diff(num_splits)
    assert num_splits[0] == 0, context
    assert (splits >= 1).all(), f"a request without a split: {context}"
    assert num_splits[-1] <= batch + parts, context

    pieces = [[] for _ in range(batch)]  # per request: (begin, end, split index, part)
    seen_empty = False
    for p, row in enumerate(metadata.tolist()):
        begin_req, end_req, begin_block, end_block, begin_split, first_split, last_split, pad = row
        assert pad == 0, context
        if begin_req == batch:
            # Empty parts come only after every request is placed.
            assert row == [batch, batch - 1, 0, int(blocks[-1]), 0, 0, 0, 0], context
            seen_empty = True
            continue
        assert not seen_empty, f"non-empty part {p} after an empty one: {context}"
        assert 0 <= begin_req <= end_req < batch, context
        assert first_split == int(splits[begin_req] > 1), context
        assert last_split == int(splits[end_req] > 1), context
        cost = 0
        for req in range(begin_req, end_req + 1):
            lo = begin_block if req == begin_req else 0
            hi = end_block if req == end_req else int(blocks[req])
            assert 0 <= lo <= hi <= blocks[req], f"part {p} request {req}: {context}"
            if blocks[req] > 0:
                assert hi > lo, f"empty piece of request {req} in part {p}: {context}"
            if hi < blocks[req]:  # split here: it did not fit in what was left of the payload
                assert cost + blocks[req] - lo + F > payload, f"part {p} split request {req}: {context}"
            pieces[req].append((lo, hi, begin_split if req == begin_req else 0, p))
            cost += hi - lo + F
        assert cost <= payload, f"part {p} costs {cost} > payload {payload}: {context}"

    slots = []
    for req, found in enumerate(pieces):
        # The request's blocks are covered exactly once, in order, by consecutive parts.
        assert len(found) == splits[req], f"request {req}: {found} vs {splits[req]}: {context}"
        assert found[0][0] == 0 and found[-1][1] == blocks[req], context
        for (lo, hi, idx, p), (lo2, _, idx2, p2) in zip(found, found[1:]):
            assert hi == lo2 and p2 == p + 1 and idx2 == idx + 1, context
        assert [idx for _, _, idx, _ in found] == list(range(len(found))), context
        slots.extend(int(num_splits[req]) + idx for _, _, idx, _ in found)
    assert sorted(slots) == list(range(int(num_splits[-1]))), context
    # Tokens: the last piece of each request stops at min(end_block * B, seqlen).
    for req, found in enumerate(pieces):
        assert min(found[-1][1] * B, int(seqlens[req])) == seqlens[req], context
    return metadata, num_splits


def test_hand_worked_examples():
    # Two requests of 10 blocks over 2 parts: total 30, payload 20, one request each.
    meta, splits = schedule(np.array([640, 640], np.int32), 2)
    assert meta.tolist() == [[0, 0, 0, 10, 0, 0, 0, 0], [1, 1, 0, 10, 0, 0, 0, 0]]
    assert splits.tolist() == [0, 1, 2]
    # One request of 30 blocks over 2 parts: total 35, but each part pays F once: payload 15 + 5
    # (not 18 + 5), split after 15 blocks.
    meta, splits = schedule(np.array([30 * 64], np.int32), 2)
    assert meta.tolist() == [[0, 0, 0, 15, 0, 1, 1, 0], [0, 0, 15, 30, 1, 1, 1, 0]]
    assert splits.tolist() == [0, 2]
    # Two short requests over 3 parts: total 12, payload 10 (the 2F floor); the second
    # request does not fit in what part 0 has left, and part 2 stays empty.
    meta, splits = schedule(np.array([1, 1], np.int32), 3)
    assert meta.tolist() == [[0, 0, 0, 1, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 0, 0],
                             [2, 1, 0, 1, 0, 0, 0, 0]]
    assert splits.tolist() == [0, 1, 2]
    # Blocks [1, 2] over 2 parts: P would be 12 (request 1 split after its first block); the
    # smaller payload, 10 (the 2F floor), places both whole, one per part.
    meta, splits = schedule(np.array([1, 65], np.int32), 2)
    assert meta.tolist() == [[0, 0, 0, 1, 0, 0, 0, 0], [1, 1, 0, 2, 0, 0, 0, 0]]
    assert splits.tolist() == [0, 1, 2]
    # Two empty requests: payload 10 holds both exactly (a request fits when remain == cost).
    meta, splits = schedule(np.array([0, 0], np.int32), 2)
    assert meta.tolist() == [[0, 1, 0, 0, 0, 0, 0, 0], [2, 1, 0, 0, 0, 0, 0, 0]]
    assert splits.tolist() == [0, 1, 2]
    # A 1-token request followed by a long one that spans four parts.
    meta, splits = schedule(np.array([1, 64 * 100], np.int32), 4)
    # total 111, payload 33: part 0 takes request 0 (6) and 22 blocks of request 1.
    assert meta[0].tolist() == [0, 1, 0, 22, 0, 0, 1, 0]
    assert meta[1].tolist() == [1, 1, 22, 50, 1, 1, 1, 0]
    assert meta[3].tolist() == [1, 1, 78, 100, 3, 1, 1, 0]
    assert splits.tolist() == [0, 1, 5]
    check_schedule([1, 64 * 100], 4)


def test_the_larger_payload_where_it_halves_the_splits():
    # 128 requests of 64 blocks over 33 parts: total 128 * 69 = 8832, P = 268 + 5 = 273. At P
    # three requests (207) leave 66 of the 69 a fourth costs: 29 splits. At P + (273 >> 6) = 277
    # every part takes four whole requests: no split, so that payload is taken.
    assert choose_payload([64] * 128, 33) == 277
    meta, splits = schedule(np.full(128, 4096, np.int32), 33)
    assert np.diff(splits).tolist() == [1] * 128
    assert meta[0].tolist() == [0, 3, 0, 64, 0, 0, 0, 0]
    assert meta[31].tolist() == [124, 127, 0, 64, 0, 0, 0, 0]
    assert meta[32].tolist() == [128, 127, 0, 64, 0, 0, 0, 0]  # nothing left for the last part
    check_schedule(np.full(128, 4096, np.int32), 33)
    # 127 requests of 65 blocks: P = 270 + 5 = 275; three requests (210) leave 65 of the 70 a
    # fourth costs, and 279 would not hold four either (280): P stays.
    assert choose_payload([65] * 127, 33) == 275
    meta, splits = schedule(np.full(127, 4100, np.int32), 33)
    assert meta[0].tolist() == [0, 3, 0, 60, 0, 0, 1, 0]
    check_schedule(np.full(127, 4100, np.int32), 33)
    # Below 64 blocks the larger payload is P itself: (40 + 20) / 2 + 5.
    assert choose_payload([10] * 4, 2) == 35


def test_the_smaller_payload_for_fewer_requests_than_parts():
    # 4 requests of 128 blocks over 66 parts: total 532, P = 9 + 5 = 14 would give 9 blocks to
    # each of 58 parts. Every piece pays F, so the requests alone (512 blocks) set the payload:
    # 8 + 5 = 13, and 64 parts take 8 blocks each.
    assert choose_payload([128] * 4, 66) == 13
    meta, splits = check_schedule(np.full(4, 8192, np.int32), 66)
    assert np.diff(splits).tolist() == [16] * 4
    assert [int(r[3] - r[2]) for r in meta[:64]] == [8] * 64
    assert (meta[64:, 0] == 4).all()  # two parts left empty
    # Where the smaller payload does not place every request, P stays: [1, 100] over 4 parts
    # needs 33 (at 31 the last part would be 2 blocks short).
    assert choose_payload([1, 100], 4) == 33
    # Many requests: their own F alone exceeds what the smaller payload holds, P stays.
    assert choose_payload([64] * 128, 66) == 139  # 8832 blocks with F: more than 66 x 130


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 66, 132, 264])
@pytest.mark.parametrize("seqlens", [
    [0], [1], [63], [64], [65], [1 << 20], [0, 0, 0], [0, 1 << 20, 0],
    [4096] * 128, [1] * 300, [64 * 1000, 1, 1, 1],
])
def test_fixed_batches(seqlens, parts):
    check_schedule(seqlens, parts)


@pytest.mark.parametrize("case", range(60))
def test_random_batches(case):
    rng = np.random.default_rng(case)
    batch = int(rng.integers(1, 301))
    parts = int(rng.choice([1, 2, int(rng.integers(1, 265)), 132, 264]))
    style = case % 4
    if style == 0:  # uniform lengths
        seqlens = np.full(batch, int(rng.integers(0, 20000)))
    elif style == 1:  # varlen around a mean, as the standard sweep
        mean = int(rng.integers(1, 8192))
        seqlens = np.maximum(rng.normal(mean, mean / 4, batch), 1).astype(np.int64)
    elif style == 2:  # zeros, tiny and huge mixed
        seqlens = rng.choice([0, 0, 1, 63, 64, 65, 4096, 1 << 20], size=batch)
    else:  # heavy-tailed
        seqlens = (rng.pareto(1.0, batch) * 500).astype(np.int64).clip(0, 1 << 20)
    check_schedule(seqlens, parts)


def test_accepts_sequences_and_device_like_arrays():
    class FakeDeviceArray:
        def get(self):
            return np.array([100, 200], np.int32)

    a = schedule([100, 200], 3)
    b = schedule(FakeDeviceArray(), 3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="cache_seqlens"):
        schedule(np.array([], np.int32), 2)
    with pytest.raises(ValueError, match="cache_seqlens"):
        schedule(np.array([[1, 2]], np.int32), 2)
    with pytest.raises(ValueError, match="cache_seqlens"):
        schedule(np.array([5, -1], np.int32), 2)
    with pytest.raises(TypeError, match="cache_seqlens"):
        schedule(np.array([5.0]), 2)
    with pytest.raises(ValueError, match="num_sm_parts"):
        schedule([5], 0)
    with pytest.raises(TypeError, match="num_sm_parts"):
        schedule([5], 2.0)


@pytest.mark.parametrize("num_sms,rows,heads,expected", [
    (132, 128, 1, 66),    # s_q 1, h_q 128: two 64-row tiles
    (132, 16, 1, 132),    # one (padded) tile
    (132, 64, 1, 132),
    (132, 65, 1, 66),
    (132, 256, 1, 33),    # s_q 2, h_q 128
    (132, 64, 2, 66),     # two KV heads
    (132, 64, 3, 44),
    (132, 16 * 64, 1, 8),
    (132, 64, 200, 1),    # more heads than SMs: at least one part
    (132, 100000, 1, 1),
    (1, 1, 1, 1),
])
def test_num_sm_parts(num_sms, rows, heads, expected):
    assert num_sm_parts(num_sms, rows, heads) == expected
    assert num_sm_parts(num_sms, rows, heads) == max(
        num_sms // heads // -(-rows // SCHED_BLOCK_TOKENS), 1)


def test_num_sm_parts_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_sms"):
        num_sm_parts(0, 1, 1)
    with pytest.raises(ValueError, match="num_q_tokens_per_head_k"):
        num_sm_parts(132, 0, 1)
    with pytest.raises(ValueError, match="num_heads_k"):
        num_sm_parts(132, 1, 0)
    with pytest.raises(TypeError, match="num_heads_k"):
        num_sm_parts(132, 1, 1.0)
    with pytest.raises(TypeError, match="num_sms"):
        num_sm_parts(True, 1, 1)
    assert num_sm_parts(np.int64(132), np.int32(128), np.int32(1)) == 66
