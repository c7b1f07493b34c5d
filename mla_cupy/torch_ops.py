"""mla_cupy's two decode calls as PyTorch custom ops, for ``torch.compile`` and CUDA graphs.

Importing this module (it needs PyTorch 2.4 or newer; ``import mla_cupy`` alone never imports
torch) registers, with ``torch.library.custom_op``:

* ``torch.ops.mla_cupy.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k,
  num_heads_q=None, is_fp8_kvcache=False, topk=None) -> (tile_scheduler_metadata, num_splits)``
* ``torch.ops.mla_cupy.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens,
  head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale=None, causal=False,
  is_fp8_kvcache=False, indices=None) -> (out, lse)``

with FlashMLA's positional arguments (mla_cupy's keyword-only options are left out) and
fake (meta) implementations that give the results' shapes and dtypes without running
anything, so that ``torch.compile(fullgraph=True)`` traces through them as single opaque
nodes. The module-level names :data:`get_mla_metadata` and :data:`flash_mla_with_kvcache` are
the same ops (callable like functions).

The real implementations call :func:`mla_cupy.get_mla_metadata` and
:func:`mla_cupy.flash_mla_with_kvcache` on the tensors, on torch's current CUDA stream. ``out``
and ``lse`` are allocated by torch (``torch.empty``, so inside a CUDA-graph capture they come
from the graph's memory pool) and written by the kernels; the schedule arrays are allocated by
torch too once a call signature has been seen. Neither op reads device data on the host, so a
decode step made of them can be captured in a ``torch.cuda.CUDAGraph`` (after one eager step on
the capture stream, as with CuPy's capture: see the README's CUDA-graph rules) and compiled
with ``mode="reduce-overhead"``.

The ops are for inference: no autograd formula is registered.
"""

from typing import Optional

try:
    import torch
except ImportError as exc:  # say what is missing rather than a bare ModuleNotFoundError
    raise ImportError(f"mla_cupy.torch_ops needs PyTorch 2.4 or newer, which cannot be imported ({exc}); "
                      "the rest of mla_cupy works without it") from exc

if not hasattr(torch, "library") or not hasattr(torch.library, "custom_op"):
    raise ImportError(f"mla_cupy.torch_ops needs PyTorch 2.4 or newer (torch.library.custom_op); "
                      f"this is PyTorch {torch.__version__}")

from . import _select, interface  # noqa: E402
from .support import SCHED_METADATA_SIZE  # noqa: E402

__all__ = ["NAMESPACE", "get_mla_metadata", "flash_mla_with_kvcache"]

NAMESPACE = "mla_cupy"  # the ops are torch.ops.mla_cupy.<name>


def _plain_int(name, value):
    """An int argument as a Python int (a SymInt is specialized), checked positive."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def _num_sm_parts(device, num_q_tokens_per_head_k, num_heads_k):
    """Rows of ``tile_scheduler_metadata`` that ``get_mla_metadata`` makes on `device` (a
    ``torch.device``): the same number the real call computes (the device's SMs, the kernel
    family in force)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _select.sm_parts(index, num_q_tokens_per_head_k, num_heads_k)


def _decode_shapes(q, head_dim_v):
    """Shapes of ``out`` and ``lse`` for `q` and `head_dim_v`; ValueError when `q` is no
    ``[batch, s_q, h_q, head_dim]`` tensor."""
    if q.dim() != 4:
        raise ValueError(f"q: expected 4 dimensions [batch, s_q, h_q, head_dim], got {q.dim()} "
                         f"(shape {tuple(q.shape)})")
    batch, s_q, h_q, _ = q.shape
    return (batch, s_q, h_q, head_dim_v), (batch, h_q, s_q)


@torch.library.custom_op(f"{NAMESPACE}::get_mla_metadata", mutates_args=())
def get_mla_metadata(cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int,
                     num_heads_q: Optional[int] = None, is_fp8_kvcache: bool = False,
                     topk: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mla_cupy.get_mla_metadata` as a torch op: int32 ``[num_sm_parts, 8]`` and
    ``[batch + 1]``, computed on the GPU on torch's current stream."""
    return interface.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q,
                                      is_fp8_kvcache, topk)


@get_mla_metadata.register_fake
def _get_mla_metadata_fake(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
                           is_fp8_kvcache=False, topk=None):
    if cache_seqlens.dim() != 1:
        raise ValueError(f"cache_seqlens: expected 1 dimension [batch], got {cache_seqlens.dim()} "
                         f"(shape {tuple(cache_seqlens.shape)})")
    parts = _num_sm_parts(cache_seqlens.device, _plain_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k),
                          _plain_int("num_heads_k", num_heads_k))
    sched = cache_seqlens.new_empty((parts, SCHED_METADATA_SIZE), dtype=torch.int32)
    num_splits = cache_seqlens.new_empty((cache_seqlens.shape[0] + 1,), dtype=torch.int32)
    return sched, num_splits


@torch.library.custom_op(f"{NAMESPACE}::flash_mla_with_kvcache", mutates_args=())
def flash_mla_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                           cache_seqlens: torch.Tensor, head_dim_v: int, tile_scheduler_metadata: torch.Tensor,
                           num_splits: torch.Tensor, softmax_scale: Optional[float] = None, causal: bool = False,
                           is_fp8_kvcache: bool = False,
                           indices: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mla_cupy.flash_mla_with_kvcache` as a torch op: ``out`` ``[batch, s_q, h_q,
    head_dim_v]`` in q's dtype and ``lse`` float32 ``[batch, h_q, s_q]``, on torch's current
    stream."""
    try:
        out_shape, lse_shape = _decode_shapes(q, head_dim_v)
        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError in newer torch) not an argument error
        raise
    except (TypeError, ValueError, RuntimeError):
        # Arguments no output can be made for: the library's checks say what is wrong.
        return interface.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                                tile_scheduler_metadata, num_splits, softmax_scale, causal,
                                                is_fp8_kvcache, indices)
    interface.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                     num_splits, softmax_scale, causal, is_fp8_kvcache, indices, out=out, lse=lse)
    return out, lse


@flash_mla_with_kvcache.register_fake
def _flash_mla_with_kvcache_fake(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                 num_splits, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None):
    out_shape, lse_shape = _decode_shapes(q, _plain_int("head_dim_v", head_dim_v))
    return q.new_empty(out_shape), q.new_empty(lse_shape, dtype=torch.float32)
