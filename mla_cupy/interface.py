"""Public entry points, a drop-in for FlashMLA's ``flash_mla_interface``.

Each call: import the caller's arrays (``_interop``), check every argument (``_validate``), ask
``_select`` which kernel family runs the problem, and run that family's launch (parameter
blocks, grid, kernels) on the call's stream. Everything but the pointers is worked out once per
call signature and kept in a plan. No host sync on the decode path unless ``validate=True``: a
decode step can be captured in a CUDA graph.
"""

import collections
import contextlib
import logging
import threading
import time

import numpy as np

from . import _compile, _driver, _launch, _metadata, _params, _select, _validate
from ._errors import UnsupportedDeviceError, no_gpu_error, no_gpu_reason, workspace_out_of_memory_error
from .support import MIN_COMPUTE_CAPABILITY

logger = logging.getLogger("mla_cupy")


def _check_device(device_id):
    cc = _launch.device_info(device_id)[0]
    need = MIN_COMPUTE_CAPABILITY[0] * 10 + MIN_COMPUTE_CAPABILITY[1]
    if cc < need:
        raise UnsupportedDeviceError(
            f"device {device_id}: compute capability {cc // 10}.{cc % 10} is older than the "
            f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} mla_cupy needs")


def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
                     is_fp8_kvcache=False, topk=None, *, stream=None, validate=None):
    """Tile-scheduler metadata splitting a batch's KV work over the GPU's SMs.

    Parameters
    ----------
    cache_seqlens : int32 array [batch] on the GPU
        Tokens in the KV cache of each request.
    num_q_tokens_per_head_k : int
        Query rows per KV head, ``s_q * num_heads_q // num_heads_k``.
    num_heads_k : int
        KV heads (1 for MLA).
    num_heads_q : int, optional
        Query heads; only checked to be a multiple of ``num_heads_k``.
    is_fp8_kvcache, topk
        FlashMLA's fp8 and sparse options; not supported in this version (must stay off).
    stream : optional, keyword-only
        Stream to run on; default: the current stream of the inputs' framework.
    validate : bool, optional, keyword-only
        Also check the seqlens' values (>= 0, < 2^31 - 256): a host sync. Default: the
        ``MLA_CUPY_VALIDATE`` environment variable.

    Returns
    -------
    tile_scheduler_metadata : int32 array [num_sm_parts, 8]
    num_splits : int32 array [batch + 1]
        Both in the caller's array type, computed on the GPU without a host sync; reuse them
        for every layer of a decode step with these ``cache_seqlens``.
    """
    fast_key = None
    if stream is None and not _validate.resolve_validate(validate):
        sig = _signature((cache_seqlens,))
        if sig is not None:
            fast_key = (sig[1], *_typed(num_q_tokens_per_head_k, num_heads_k, num_heads_q, is_fp8_kvcache),
                        topk is None, _kind())
            entry = _cached(_fast_metadata, fast_key)
            if entry is not None:
                return entry.run(sig[2][0], cache_seqlens)
    arrays, ctx = _import({"cache_seqlens": cache_seqlens}, stream)
    seqlens = arrays["cache_seqlens"]
    key = (ctx.device_id, _array_key(seqlens), *_typed(num_q_tokens_per_head_k, num_heads_k, num_heads_q,
                                                         is_fp8_kvcache), topk is None, _kind())
    parts = _cached(_metadata_parts, key)
    if parts is None:
        _validate.check_metadata_args(seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q,
                                      is_fp8_kvcache, topk)
        _check_device(ctx.device_id)
        parts = _select.sm_parts(ctx.device_id, int(num_q_tokens_per_head_k), int(num_heads_k))
        _remember(_metadata_parts, key, parts)
    with ctx.activate():
        if _validate.resolve_validate(validate):
            _validate.check_seqlens_data(seqlens)
        sched, num_splits = _metadata.run(ctx.device_id, ctx.stream, seqlens, parts)
    if fast_key is not None and sig[0] == ctx.framework and sig[3] == ctx.device_id:
        fast = _FastMetadataJax if sig[0] == "jax" else _FastMetadata
        _remember(_fast_metadata, fast_key, fast(sig[0], ctx.device_id, seqlens.shape[0], parts))
    return ctx.export(sched), ctx.export(num_splits)


_metadata_parts = collections.OrderedDict()  # validated get_mla_metadata signatures -> num_sm_parts
# Fast-path keys (``_interop.signature`` and the scalars) of signatures that have passed the full
# path -> _FastMetadata / _FastDecode.
_fast_metadata = collections.OrderedDict()
_fast_plans = collections.OrderedDict()


class _FastMetadata:
    """get_mla_metadata for a validated signature whose arrays are one framework's (CuPy,
    torch or JAX) on the current device, with no stream argument: the outputs are allocated by
    that framework (JAX: by CuPy, then exported) and the scheduler runs on its current stream
    (JAX: CuPy's)."""

    def __init__(self, framework, device_id, batch, parts):
        from . import _interop

        self.framework, self.device_id = framework, device_id
        self.launch = _metadata.launcher(device_id, batch, parts)
        self.new_results = _interop.pair_factory(framework, device_id,
                                                 ((parts, _metadata.SCHED_METADATA_SIZE), "int32"),
                                                 ((batch + 1,), "int32"))
        self.stream = _interop.current_stream_ptr

    def run(self, seqlens, _cache_seqlens=None):
        sched, sched_ptr, num_splits, splits_ptr = self.new_results()
        self.launch(self.stream(self.framework, self.device_id), seqlens, sched_ptr, splits_ptr)
        return sched, num_splits


class _FastMetadataJax(_FastMetadata):
    """_FastMetadata for JAX arrays: the call's stream waits for JAX's pending write of the
    seqlens first, and the results go back as jax.Arrays."""

    def __init__(self, framework, device_id, batch, parts):
        from . import _interop

        super().__init__(framework, device_id, batch, parts)
        self.order, self.export = _interop.jax_order, _interop.JaxResults(device_id)

    def run(self, seqlens, cache_seqlens):
        stream = self.stream(self.framework, self.device_id)
        self.order((cache_seqlens,), stream)
        sched, sched_ptr, num_splits, splits_ptr = self.new_results()
        self.launch(stream, seqlens, sched_ptr, splits_ptr)
        return self.export(sched), self.export(num_splits)


class _FastDecode:
    """flash_mla_with_kvcache for a validated signature (see _FastMetadata): pointers in, the
    plan's launch on the framework's current stream, results in the framework's arrays."""

    def __init__(self, framework, device_id, plan):
        from . import _interop

        self.framework, self.device_id, self.plan = framework, device_id, plan
        self.launch = plan.launch.launch
        self.new_out = _interop.output_factory(framework, device_id, plan.out_shape, plan.pb.dtype)
        self.new_lse = _interop.output_factory(framework, device_id, plan.lse_shape, "float32")
        self.new_results = _interop.pair_factory(framework, device_id, (plan.out_shape, plan.pb.dtype),
                                                 (plan.lse_shape, "float32"))
        self.stream = _interop.current_stream_ptr

    def run(self, pointers, out, lse, _args=None):
        stream = self.stream(self.framework, self.device_id)
        if out is None and lse is None:
            out, out_ptr, lse, lse_ptr = self.new_results()
        else:
            out, out_ptr = self.new_out() if out is None else (out, pointers[6])
            lse, lse_ptr = self.new_lse() if lse is None else (lse, pointers[7])
        self.launch_into(stream, pointers, out_ptr, lse_ptr)
        return out, lse

    def launch_into(self, stream, pointers, out_ptr, lse_ptr):
        plan = self.plan
        o_accum, lse_accum, _held = _workspace(self.device_id, stream, plan.ws_rows, plan.ws_cols)
        self.launch(stream, pointers[:6], out_ptr, lse_ptr, o_accum, lse_accum)


class _FastDecodeJax(_FastDecode):
    """_FastDecode for JAX arrays (never out= / lse=: JAX arrays are immutable): the call's
    stream waits for JAX's pending writes of the inputs first, and the results go back as
    jax.Arrays."""

    def __init__(self, framework, device_id, plan):
        from . import _interop

        super().__init__(framework, device_id, plan)
        self.order, self.export = _interop.jax_order, _interop.JaxResults(device_id)

    def run(self, pointers, out, lse, args):
        stream = self.stream(self.framework, self.device_id)
        self.order(args, stream)  # (out and lse are None with JAX)
        out, out_ptr, lse, lse_ptr = self.new_results()
        self.launch_into(stream, pointers, out_ptr, lse_ptr)
        return self.export(out), self.export(lse)


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                           tile_scheduler_metadata, num_splits, softmax_scale=None, causal=False,
                           is_fp8_kvcache=False, indices=None, *, out=None, lse=None, stream=None,
                           validate=None):
    """Multi-head latent attention decode over a paged KV cache.

    Parameters
    ----------
    q : array [batch, s_q, h_q, head_dim], bfloat16 or float16, on the GPU
    k_cache : array [num_blocks, page_block_size, h_kv, head_dim], same dtype
        Paged cache of keys; the values are its first ``head_dim_v`` columns.
    block_table : int32 array [batch, max_blocks_per_seq]
        Entry j of a row is the cache block holding tokens [j * page, (j + 1) * page).
    cache_seqlens : int32 array [batch]
    head_dim_v : int
        512 for head_dim 576 or 512, 256 for head_dim 320.
    tile_scheduler_metadata, num_splits : arrays
        From :func:`get_mla_metadata` on the same ``cache_seqlens``.
    softmax_scale : float, optional
        Default ``head_dim ** -0.5``.
    causal : bool
        Bottom-right aligned: query token i of s_q sees keys ``0 .. seqlen - s_q + i``.
    is_fp8_kvcache, indices
        FlashMLA's fp8 and sparse options; not supported in this version.
    out, lse : arrays, optional, keyword-only
        Buffers to write ([batch, s_q, h_q, head_dim_v] of q's dtype; float32 [batch, h_q, s_q]),
        C-contiguous; the results are views of them (CuPy: the same objects). Not with JAX
        inputs, whose arrays are immutable.
    stream : optional, keyword-only
        Stream to run on; default: the current stream of the inputs' framework, else CuPy's.
    validate : bool, optional, keyword-only
        Also check device data (seqlens against the block table, block ids against the cache,
        the schedule against the seqlens): a host sync. Default: the ``MLA_CUPY_VALIDATE``
        environment variable.

    Returns
    -------
    out : [batch, s_q, h_q, head_dim_v], q's dtype
    lse : float32 [batch, h_q, s_q], natural log of each row's softmax denominator; a row that
        sees no key has out 0 and lse +inf.
    """
    fast_key = None
    if stream is None and not _validate.resolve_validate(validate):
        args = (q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, out, lse)
        sig = _signature(args)
        if sig is not None:
            fast_key = (sig[1], type(head_dim_v), head_dim_v, type(softmax_scale), softmax_scale, type(causal), causal,
                        type(is_fp8_kvcache), is_fp8_kvcache, indices is None, _kind())
            entry = _cached(_fast_plans, fast_key)
            if entry is not None:
                return entry.run(sig[2], out, lse, args)
    named = {"q": q, "k_cache": k_cache, "block_table": block_table, "cache_seqlens": cache_seqlens,
             "tile_scheduler_metadata": tile_scheduler_metadata, "num_splits": num_splits,
             "out": out, "lse": lse}
    a, ctx = _import(named, stream)
    if ctx.framework == "jax" and (out is not None or lse is not None):
        raise TypeError(f"{'out' if out is not None else 'lse'}: JAX arrays are immutable and cannot be "
                        "written in place; leave out= and lse= unset with JAX inputs")
    key = (ctx.device_id, *_typed(head_dim_v, softmax_scale, causal, is_fp8_kvcache), indices is None,
           *[_array_key(x) for x in a.values()], _kind())
    plan = _cached(_plans, key)
    if plan is None:
        pb = _validate.check_decode_args(a["q"], a["k_cache"], a["block_table"], a["cache_seqlens"], head_dim_v,
                                         a["tile_scheduler_metadata"], a["num_splits"], softmax_scale, causal,
                                         is_fp8_kvcache, indices, a["out"], a["lse"])
        _check_device(ctx.device_id)
        choice = _select.decode_choice(ctx.device_id, pb.dtype, pb.head_dim, pb.head_dim_v, pb.m, pb.page_block_size)
        plan = _DecodePlan(ctx.device_id, a, pb, choice)
        _remember(_plans, key, plan)
    with ctx.activate():  # on the call's stream, so a validating read sees the producer's writes
        if _validate.resolve_validate(validate):
            _validate.check_device_data(a["block_table"], a["cache_seqlens"], plan.pb,
                                        a["tile_scheduler_metadata"], a["num_splits"])
        out_a, lse_a = plan.run(ctx, a)
    if fast_key is not None and sig[0] == ctx.framework and sig[3] == ctx.device_id:
        fast = _FastDecodeJax if sig[0] == "jax" else _FastDecode
        _remember(_fast_plans, fast_key, fast(sig[0], ctx.device_id, plan))
    return ctx.export(out_a), ctx.export(lse_a)


_kind = _select.kind  # part of every cache key: a forced() block gets plans of its own


def _typed(*values):
    """Scalars for a cache key, each with its type: 512 and 512.0 are different arguments."""
    return tuple(item for v in values for item in (type(v), v))


def _array_key(x):
    """Everything the validators look at in an array: shape, strides, dtype, 16-byte alignment."""
    return None if x is None else (x.shape, x.strides, x.dtype, x.data.ptr & 15)


# Validated call signatures (see _array_key) -> their launch plan; checks run once per signature.
_plans = collections.OrderedDict()
# Entries each of the four signature caches (_plans, _metadata_parts, _fast_plans,
# _fast_metadata) keeps; past it the least recently used one is dropped (and rebuilt, checks
# included, if its signature comes back).
_MAX_PLANS = 256


def _cached(cache, key):
    """The entry of `key` in `cache` (an OrderedDict kept in order of use), marked as the most
    recently used one; None when there is none."""
    try:
        value = cache.get(key)
    except TypeError:  # an unhashable argument: let the validators name it
        return None
    if value is not None:
        try:
            cache.move_to_end(key)
        except KeyError:  # dropped by another thread in between
            pass
    return value


def _remember(cache, key, value):
    """Store `value` under `key` as the most recently used entry, dropping the least recently
    used ones past _MAX_PLANS."""
    try:
        cache[key] = value
        cache.move_to_end(key)
    except (TypeError, KeyError):
        return
    while len(cache) > _MAX_PLANS:
        try:
            cache.popitem(last=False)
        except KeyError:  # emptied by another thread
            break


class _DecodePlan:
    """Everything about a call signature that does not change from call to call: the checked
    problem, output shapes and the chosen family's launch (parameter templates, grid, kernels)."""

    def __init__(self, device_id, a, pb, choice):
        self.device_id, self.pb = device_id, pb
        self.launch = choice.family.DecodeLaunch(device_id, a, pb, choice.config)
        self.ws_rows, self.ws_cols = self.launch.workspace
        self.out_shape = (pb.batch, pb.s_q, pb.h_q, pb.head_dim_v)
        self.lse_shape = (pb.batch, pb.h_q, pb.s_q)
        self.dtype = a["q"].dtype

    def run(self, ctx, a):
        """Allocates what is missing and launches the family's kernels (inside ctx.activate())."""
        import cupy

        out_a = a["out"] if a["out"] is not None else cupy.empty(self.out_shape, dtype=self.dtype)
        lse_a = a["lse"] if a["lse"] is not None else cupy.empty(self.lse_shape, dtype=np.float32)
        stream = ctx.stream.ptr
        o_accum, lse_accum, _held = _workspace(ctx.device_id, stream, self.ws_rows, self.ws_cols)
        self.launch.launch(stream, _params.input_pointers(a), out_a.data.ptr, lse_a.data.ptr, o_accum, lse_accum)
        return out_a, lse_a


def _signature(arrays):
    """``_interop.signature(arrays)`` when its device is the current one, else None (also where
    CuPy is missing: the full path says so)."""
    interop = _fast_interop
    if interop is None:
        try:
            from . import _interop as interop
        except ImportError:
            return None
        _set_fast_interop(interop)
    sig = interop.signature(arrays)
    if sig is None or sig[3] != interop.current_device():
        return None
    return sig


_fast_interop = None  # the _interop module once imported (it imports CuPy)


def _set_fast_interop(module):
    global _fast_interop
    _fast_interop = module


def _import(named, stream):
    try:
        from . import _interop
    except ImportError as exc:  # CuPy missing: the reference and the helpers still work
        raise no_gpu_error(exc) from None
    return _interop.import_arrays(named, stream)


# The split-KV workspace: one fp32 buffer per (device, stream), grown on demand and shared by the
# calls on that stream (stream order makes the sharing safe); the per-thread default stream,
# one address for a different stream in each thread, has one per thread (_key).
#
# Calls captured into CUDA graphs get a buffer of their own per stream (the stream's "graph"
# workspace), apart from the one its eager calls share: a graph replayed on any stream, while
# eager calls run on its capture stream, never writes the buffer they use. Graphs captured on
# one stream share that stream's graph workspace, so they must not be replayed at the same time.
#
# What is kept: an eager buffer that is outgrown is dropped, and CuPy's pool takes its memory
# back (the pool reuses memory only for allocations on the stream it was allocated for, which
# _allocate makes the workspace's own stream, so work still queued there cannot see it reused).
# A graph buffer that is outgrown is kept for the life of the process (_retired), since the
# graphs that use it can be replayed at any time. At most _MAX_WORKSPACES eager buffers are
# kept; past that, the least recently grown one is dropped (a later call on its stream
# allocates a new one).
#
# Out of memory: a new buffer is asked for with half again the size needed (so that slowly
# growing shapes do not reallocate every call), then, failing that, with exactly the size
# needed; failing that too, WorkspaceOutOfMemoryError. The stream's previous buffer is out of
# _workspaces by then (its memory back in the pool, or kept for a graph), so a later, smaller
# call simply allocates again: nothing is left half done.


class _Workspace:
    """One stream's buffer: its address, its size in fp32 elements, and whether it is a graph
    workspace (handed out only while the stream was capturing a CUDA graph)."""

    __slots__ = ("buffer", "base", "size", "captured")

    def __init__(self, buffer):
        self.buffer, self.base, self.size, self.captured = buffer, buffer.data.ptr, buffer.size, False


_workspaces = {}  # _key(...) -> _Workspace, least recently grown first
_retired = []  # outgrown buffers a CUDA graph may use
_MAX_WORKSPACES = 64
_workspace_lock = threading.Lock()


_PER_THREAD_STREAM = 2  # cudaStreamPerThread: one address, a different stream in each thread


def _key(device_id, stream, graph=False):
    """The _workspaces key of stream `stream` (an address) on device `device_id`, for its eager
    calls or (`graph`) for its calls captured into CUDA graphs: the per-thread default stream
    has one address for every thread, so its key also names the thread."""
    key = (device_id, stream, threading.get_ident()) if stream == _PER_THREAD_STREAM else (device_id, stream)
    return (*key, "graph") if graph else key


def _workspace(device_id, stream, rows, dv):
    """Device pointers of o_accum [rows, dv] and lse_accum [rows] (fp32) for stream `stream` (an
    address) of device `device_id`, the current device, and the buffer holding them: the caller
    keeps it until its kernels are queued, in case another thread drops the buffer meanwhile."""
    graph = _capturing(stream)
    key = _key(device_id, stream, graph)
    ws = _workspaces.get(key)
    if ws is None or ws.size < rows * (dv + 1):
        try:
            ws = _grow(device_id, stream, rows * (dv + 1), key, graph)
        except MemoryError as exc:
            raise workspace_out_of_memory_error(device_id, rows, dv, exc) from exc
    return ws.base, ws.base + rows * dv * 4, ws.buffer


def _grow(device_id, stream, need, key, graph):
    """A buffer of at least `need` elements for `key` (stream `stream` of `device_id`, a graph
    workspace if `graph`), replacing its smaller one (see above for what happens to that one)."""
    with _workspace_lock:
        old = _workspaces.get(key)
        if old is not None and old.size >= need:  # grown by another thread meanwhile
            return old
        _drop(key)  # first, so that the pool may reuse its memory right away
        excess = len(_workspaces) + 1 - _MAX_WORKSPACES
        if excess > 0 and not graph:  # a capture must not free memory (no pool: a cudaFree)
            for other in [k for k, w in _workspaces.items() if not w.captured][:excess]:
                _drop(other)
        try:
            buffer = _allocate(device_id, stream, need + need // 2, graph)
        except MemoryError:
            buffer = None
        if buffer is None:  # outside the except clause, so that a second failure is not chained to it
            buffer = _allocate(device_id, stream, need, graph)
        ws = _Workspace(buffer)
        ws.captured = graph
        _workspaces[key] = ws
        return ws


def _drop(key):
    """Take `key`'s workspace out; its buffer is freed unless it is a graph workspace."""
    ws = _workspaces.pop(key, None)
    if ws is not None and ws.captured:
        _retire(ws.buffer)


def _retire(buffer):
    if not any(b is buffer for b in _retired):
        _retired.append(buffer)


def _allocate(device_id, stream, n, graph=False):
    """A new fp32 CuPy array of `n` elements on device `device_id` (the current one), allocated
    with stream `stream` current, so that CuPy's pool reuses its memory, once it is dropped,
    only for that stream's allocations. `graph`: the stream is capturing a CUDA graph; the
    allocation is then made in the relaxed capture mode (a capture in the global mode, torch's
    default, forbids the cudaMalloc behind it)."""
    import cupy

    with _driver.relaxed_capture_mode() if graph else contextlib.nullcontext():
        current = cupy.cuda.get_current_stream(device_id)
        if current.ptr == stream:
            return cupy.empty((n,), dtype=np.float32)
        cupy.cuda.ExternalStream(stream, device_id).use()
        try:
            return cupy.empty((n,), dtype=np.float32)
        finally:
            current.use()


def _capturing(stream):
    """Whether stream `stream` (an address) is capturing a CUDA graph; True where CUDA cannot
    tell (the legacy default stream while another stream captures): the safe answer here."""
    try:
        return bool((_is_capturing or _load_is_capturing())(stream))
    except Exception:  # noqa: BLE001 - cudaErrorStreamCaptureImplicit and the like
        return True


def _load_is_capturing():
    global _is_capturing
    import cupy

    _is_capturing = cupy.cuda.runtime.streamIsCapturing
    return _is_capturing


_is_capturing = None  # cupy.cuda.runtime.streamIsCapturing once CuPy is imported


def _workspace_bytes():
    """(streams with a workspace, bytes of their buffers, bytes of the retired buffers kept for
    CUDA graphs): what the split-KV workspace holds now."""
    held = list(_workspaces.values())
    return len(held), sum(w.buffer.nbytes for w in held), sum(b.nbytes for b in list(_retired))


def warmup(head_dims=None, dtypes=None, num_q_tokens_per_head_k=None, device=None):
    """Compile (or load from the disk cache) every kernel a decode step needs, now.

    Parameters
    ----------
    head_dims : sequence of (head_dim, head_dim_v), optional
        Default: every supported pair.
    dtypes : sequence of str, optional
        "bfloat16" and/or "float16"; default both.
    num_q_tokens_per_head_k : int or sequence of int, optional
        Query rows per KV head (``s_q * h_q // h_kv``) of the calls to come; default: one of
        each decode tile size, which covers every shape.
    device : int, optional
        CUDA device id; default the current one.

    Returns
    -------
    dict
        Module name -> seconds it took to compile or load.
    """
    head_dims, dtypes, ms = _validate.check_warmup_args(head_dims, dtypes, num_q_tokens_per_head_k,
                                                        default_rows=_select.warmup_rows())
    try:
        import cupy
    except ImportError as exc:  # the same error as the decode calls raise
        raise no_gpu_error(exc) from None
    try:
        device_id = cupy.cuda.runtime.getDevice() if device is None else int(device)
        _check_device(device_id)
    except cupy.cuda.runtime.CUDARuntimeError as exc:  # no driver, no device
        raise no_gpu_error(exc) from None
    variants = [_metadata.variant()]
    choices = []
    for d, dv in head_dims:
        for m in ms:
            for dt in dtypes:
                choice = _select.decode_choice(device_id, dt, d, dv, m, _select.METADATA_PROBLEM["page_block_size"])
                variants += choice.family.variants(choice.problem, choice.config)
                choices.append(choice)
    seconds = {}
    with _compile.allow_compile():
        for variant in variants:
            if variant.name in seconds:
                continue
            t0 = time.perf_counter()
            _compile.get_module(device_id, variant)
            seconds[variant.name] = time.perf_counter() - t0
        for choice in choices:
            choice.family.prepare(device_id, choice.problem, choice.config)
    return seconds


def show_config(file=None):
    """Print versions (mla_cupy, CuPy, NVRTC, CUDA driver/runtime), the device and cache dir."""
    import sys

    from ._version import __version__

    lines = [f"mla_cupy {__version__} (kernel sources sha256 {_compile.source_digest()[:16]})"]
    try:
        import cupy

        lines.append(f"CuPy {cupy.__version__}")
        try:
            major, minor = _compile.nvrtc_version()
            lines.append(f"NVRTC {major}.{minor}")
        except UnsupportedDeviceError as exc:  # NVRTC cannot be loaded: reported, not fatal
            lines.append(str(exc))
        try:
            drv = cupy.cuda.runtime.driverGetVersion()  # 0 without a driver
            rt = cupy.cuda.runtime.runtimeGetVersion()
            lines.append(f"CUDA driver {f'{drv // 1000}.{drv % 1000 // 10}' if drv else 'not found'}, "
                         f"runtime {rt // 1000}.{rt % 1000 // 10}")
            n = cupy.cuda.runtime.getDeviceCount()
            if n < 1:
                lines.append(no_gpu_reason(None))
            for i in range(n):
                props = cupy.cuda.runtime.getDeviceProperties(i)
                cc, sms, smem, _ = _launch.device_info(i)
                lines.append(f"device {i}: {props['name'].decode()}, sm_{cc}, {sms} SMs, "
                             f"{smem // 1024} KB shared memory per block")
        except Exception as exc:  # noqa: BLE001
            lines.append(no_gpu_reason(exc))
    except ImportError as exc:
        lines.append(f"{no_gpu_reason(exc)} (mla_cupy.reference and mla_cupy.testing work without it)")
    lines.append(f"kernel cache dir: {_compile.cache_location()}")
    print("\n".join(lines), file=file or sys.stdout)
