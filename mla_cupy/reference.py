"""Float64 NumPy reference of ``flash_mla_with_kvcache`` (the oracle of the numerical contract).

The reference reads only what the kernel may read: the first ``ceil(seqlen / page)`` entries
of each row of the block table and the first ``seqlen`` slots of those pages. Anything past
that (sentinel block ids, NaN-poisoned slots) never enters a computation, so a NaN in the
reference's output points at a bad input, not at padding.

Keys are processed in chunks with a float64 online softmax, so a request of a million tokens
needs a few hundred megabytes, not the whole cache in float64 at once.
"""

import math

import numpy as np

__all__ = ["flash_mla_with_kvcache_reference"]

# Keys per chunk of the online softmax; tests lower it to exercise the chunked path.
_KEY_CHUNK = 16384

_FLOAT_KINDS = ("bfloat16", "float16", "float32", "float64")


def _host(x):
    """Return ``x`` as a NumPy array, copying a device array (anything with ``.get()``)."""
    if not isinstance(x, np.ndarray) and hasattr(x, "get"):
        x = x.get()
    return np.asarray(x)


def _to_float64(x):
    """Exact conversion to float64 (through float32 for 16-bit types: faster, same values)."""
    if x.dtype.itemsize < 4:
        x = x.astype(np.float32)
    return x.astype(np.float64)


def _float_array(x, name):
    x = _host(x)
    if x.dtype.name not in _FLOAT_KINDS:
        raise TypeError(f"{name} must be bfloat16, float16, float32 or float64, got {x.dtype}")
    return x


def _int_array(x, name):
    x = _host(x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
    return x


def _check_inputs(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale):
    """Validate the reference's arguments; return them as host arrays plus the scale."""
    q = _float_array(q, "q")
    k_cache = _float_array(k_cache, "k_cache")
    block_table = _int_array(block_table, "block_table")
    cache_seqlens = _int_array(cache_seqlens, "cache_seqlens")
    if q.ndim != 4:
        raise ValueError(f"q must have shape [b, s_q, h_q, d], got shape {q.shape}")
    if k_cache.ndim != 4:
        raise ValueError(
            f"k_cache must have shape [num_blocks, page_block_size, h_kv, d], "
            f"got shape {k_cache.shape}")
    batch, _, h_q, dim = q.shape
    _, page, h_kv, kdim = k_cache.shape
    if kdim != dim:
        raise ValueError(f"k_cache head dim must equal q's ({dim}), got {kdim}")
    if page < 1 or h_kv < 1:
        raise ValueError(f"k_cache must have non-empty pages and heads, got shape {k_cache.shape}")
    if h_q % h_kv:
        raise ValueError(f"q heads ({h_q}) must be a multiple of k_cache heads ({h_kv})")
    if isinstance(head_dim_v, (bool, np.bool_)) or not isinstance(head_dim_v, (int, np.integer)):
        raise TypeError(f"head_dim_v must be an int, got {type(head_dim_v).__name__}")
    if not 1 <= head_dim_v <= dim:
        raise ValueError(f"head_dim_v must be in [1, {dim}], got {head_dim_v}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must have shape ({batch},), got {cache_seqlens.shape}")
    if block_table.ndim != 2 or block_table.shape[0] != batch:
        raise ValueError(
            f"block_table must have shape [{batch}, max_blocks_per_seq], got {block_table.shape}")
    if batch and (cache_seqlens < 0).any():
        raise ValueError(f"cache_seqlens must be >= 0, got minimum {int(cache_seqlens.min())}")
    pages_needed = -(-cache_seqlens.astype(np.int64) // page)
    if batch and int(pages_needed.max()) > block_table.shape[1]:
        raise ValueError(
            f"block_table has {block_table.shape[1]} columns but a sequence of "
            f"{int(cache_seqlens.max())} tokens needs {int(pages_needed.max())} pages of {page}")
    for i in range(batch):
        ids = block_table[i, : pages_needed[i]]
        if ids.size and (ids.min() < 0 or ids.max() >= k_cache.shape[0]):
            raise ValueError(
                f"block_table[{i}] uses block ids outside [0, {k_cache.shape[0]}): "
                f"{ids[(ids < 0) | (ids >= k_cache.shape[0])][:4].tolist()}")
    if softmax_scale is None:
        softmax_scale = dim ** -0.5
    softmax_scale = float(softmax_scale)
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return q, k_cache, block_table, cache_seqlens.astype(np.int64), int(head_dim_v), softmax_scale


def flash_mla_with_kvcache_reference(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                     softmax_scale=None, causal=False):
    """Attention over a paged KV cache in float64, with FlashMLA's semantics.

    Parameters
    ----------
    q : array_like, shape (b, s_q, h_q, d)
        Queries; bfloat16 (ml_dtypes), float16, float32 or float64. Device arrays (anything
        with ``.get()``) are copied to the host.
    k_cache : array_like, shape (num_blocks, page_block_size, h_kv, d)
        Paged keys; the values are its first ``head_dim_v`` columns. ``h_q % h_kv == 0``;
        query head ``h`` reads KV head ``h // (h_q // h_kv)``.
    block_table : array_like of int, shape (b, max_blocks_per_seq)
        Entry ``j`` of row ``i`` is the block holding tokens ``[j * page, (j + 1) * page)``
        of request ``i``. Entries past the request's last page are never read.
    cache_seqlens : array_like of int, shape (b,)
        Tokens of each request, ``>= 0``. Slots past it are never read.
    head_dim_v : int
        Width of the values, ``1 <= head_dim_v <= d``.
    softmax_scale : float, optional
        Scale of ``q . k``; defaults to ``d ** -0.5``.
    causal : bool, optional
        Bottom-right causal mask: query ``i`` of ``s_q`` sees keys ``0 .. seqlen - s_q + i``.
        Without it every query sees all ``seqlen`` keys.

    Returns
    -------
    out : numpy.ndarray of float64, shape (b, s_q, h_q, head_dim_v)
        Attention output; 0 for a query that sees no key.
    lse : numpy.ndarray of float64, shape (b, h_q, s_q)
        Natural log of the softmax denominator of the scaled scores; ``+inf`` for a query
        that sees no key.

    Raises
    ------
    TypeError
        If an array has an unsupported dtype or ``head_dim_v`` is not an int.
    ValueError
        If shapes disagree, a sequence needs more pages than the block table has, a used
        block id is out of range, or a value is out of its domain.
    """
    q, k_cache, block_table, seqlens, dv, scale = _check_inputs(
        q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale)
    batch, s_q, h_q, dim = q.shape
    page, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = h_q // h_kv
    rows = s_q * group
    out = np.zeros((batch, s_q, h_q, dv), dtype=np.float64)
    lse = np.full((batch, h_q, s_q), np.inf, dtype=np.float64)
    pages_per_chunk = max(1, _KEY_CHUNK // page)
    # Query i of s_q may see keys up to index seqlen - s_q + i (causal), as a column per row.
    query_offset = np.repeat(np.arange(s_q, dtype=np.int64), group)

    for i in range(batch):
        n = int(seqlens[i])
        if n == 0:
            continue
        # [h_kv, rows, d] with rows ordered (query token, head within the group).
        qi = _to_float64(q[i]).reshape(s_q, h_kv, group, dim)
        qi = qi.transpose(1, 0, 2, 3).reshape(h_kv, rows, dim) * scale
        limit = (n - s_q + query_offset) if causal else np.full(rows, n - 1, np.int64)
        run_max = np.full((h_kv, rows), -np.inf)
        run_sum = np.zeros((h_kv, rows))
        acc = np.zeros((h_kv, rows, dv))
        num_pages = -(-n // page)
        for first in range(0, num_pages, pages_per_chunk):
            ids = block_table[i, first: min(first + pages_per_chunk, num_pages)]
            t0 = first * page
            t1 = min(n, t0 + ids.size * page)
            keys = _to_float64(k_cache[ids].reshape(ids.size * page, h_kv, dim)[: t1 - t0])
            visible = np.arange(t0, t1)[None, :] <= limit[:, None]  # [rows, tokens]
            for kv in range(h_kv):
                k_kv = keys[:, kv]  # [tokens, d]; a strided view BLAS reads in place
                scores = np.where(visible, qi[kv] @ k_kv.T, -np.inf)  # [rows, tokens]
                new_max = np.maximum(run_max[kv], scores.max(axis=-1))
                # Rows that have seen nothing yet keep a harmless 0 shift (all their terms are 0).
                shift = np.where(np.isneginf(new_max), 0.0, new_max)
                probs = np.exp(scores - shift[:, None])
                rescale = np.exp(run_max[kv] - shift)
                run_sum[kv] = run_sum[kv] * rescale + probs.sum(axis=-1)
                acc[kv] = acc[kv] * rescale[:, None] + probs @ k_kv[:, :dv]
                run_max[kv] = new_max
        seen = run_sum > 0
        o = np.where(seen[..., None], acc / np.where(seen, run_sum, 1.0)[..., None], 0.0)
        l_ = np.where(seen, run_max + np.log(np.where(seen, run_sum, 1.0)), np.inf)
        # Back from [h_kv, (s_q, group)] to out [s_q, h_q, dv] and lse [h_q, s_q].
        out[i] = o.reshape(h_kv, s_q, group, dv).transpose(1, 0, 2, 3).reshape(s_q, h_q, dv)
        lse[i] = l_.reshape(h_kv, s_q, group).transpose(0, 2, 1).reshape(h_q, s_q)
    return out, lse


def _brute_force_reference(q, k_cache, block_table, cache_seqlens, head_dim_v,
                           softmax_scale=None, causal=False):
    """The same attention with one Python loop per query row and per key (small shapes only).

    An independent restatement used to check :func:`flash_mla_with_kvcache_reference`: it
    looks each token up through the block table one at a time and uses a two-pass softmax.
    """
    q, k_cache, block_table, seqlens, dv, scale = _check_inputs(
        q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale)
    batch, s_q, h_q, _ = q.shape
    page, h_kv = k_cache.shape[1], k_cache.shape[2]
    out = np.zeros((batch, s_q, h_q, dv))
    lse = np.full((batch, h_q, s_q), np.inf)
    for b in range(batch):
        n = int(seqlens[b])
        for s in range(s_q):
            last = n - s_q + s if causal else n - 1
            for h in range(h_q):
                kv_head = h // (h_q // h_kv)
                qv = q[b, s, h].astype(np.float64)
                scores, values = [], []
                for t in range(min(n, last + 1)):
                    slot = k_cache[block_table[b, t // page], t % page, kv_head]
                    slot = slot.astype(np.float64)
                    scores.append(scale * float(np.dot(qv, slot)))
                    values.append(slot[:dv])
                if not scores:
                    continue
                top = max(scores)
                weights = [math.exp(x - top) for x in scores]
                total = math.fsum(weights)
                row = np.zeros(dv)
                for w, v in zip(weights, values):
                    row += w * v
                out[b, s, h] = row / total
                lse[b, h, s] = top + math.log(total)
    return out, lse
