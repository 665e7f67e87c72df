"""Mini-sequence application of a per-token function, each chunk recomputed in backward (pure torch);
why the stock non-reentrant checkpoint suffices: docs/design.md#per-chunk-recompute."""

from typing import Callable, Optional, Tuple, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from mst_megatron.ops.chunking import chunk_sizes

__all__ = ["mini_sequence_apply", "GemmsLeftEmpty"]

FnOutput = Union[torch.Tensor, Tuple]
aten = torch.ops.aten


def _split_output(result, chunk_index: int):
    """``(tensor, extras)`` from ``fn``'s return value; ``extras`` is None for a bare tensor."""
    if isinstance(result, torch.Tensor):
        return result, None
    if isinstance(result, (tuple, list)) and len(result) >= 1 and isinstance(result[0], torch.Tensor):
        return result[0], tuple(result[1:])
    raise TypeError(
        "mini_sequence_apply: fn must return a Tensor or a tuple whose first element is a Tensor; "
        f"chunk {chunk_index} returned {type(result).__name__}"
    )


class GemmsLeftEmpty(TorchDispatchMode):
    """Matrix products (``mm``, ``addmm``, ``bmm``) return uninitialised tensors of their result's
    shape instead of computing it: for a recompute whose products nobody reads."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten.mm.default:
            a, b = args[:2]
            return a.new_empty((a.shape[0], b.shape[1]))
        if func is aten.addmm.default:
            a, b = args[1:3]
            return a.new_empty((a.shape[0], b.shape[1]))
        if func is aten.bmm.default:
            a, b = args[:2]
            return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))
        return func(*args, **(kwargs or {}))


def _without_gemms(fn: Callable) -> Callable:
    """``fn`` run under :class:`GemmsLeftEmpty`."""

    def run(*args):
        with GemmsLeftEmpty():
            return fn(*args)

    return run


def _first_call_then(fn: Callable, later: Callable) -> Callable:
    """``fn`` on the first call (the chunk's forward), ``later`` on every call after (its recomputes)."""
    calls = 0

    def run(*args):
        nonlocal calls
        calls += 1
        return (fn if calls == 1 else later)(*args)

    return run


def mini_sequence_apply(
    fn: Callable[[torch.Tensor], FnOutput],
    x: torch.Tensor,
    num_chunks: int,
    dim: int = 0,
    recompute_fn: Optional[Callable[[torch.Tensor], FnOutput]] = None,
    outputs_unread: bool = False,
) -> FnOutput:
    """``fn`` applied to ``x`` split into ``num_chunks`` near-equal chunks along ``dim``, concatenated;
    with autograd recording each chunk runs under a non-reentrant checkpoint (recomputed in backward).

    * ``fn`` must be per-token along ``dim`` (output keeps the chunk's size there), deterministic (the
      RNG state is not restored for the recompute) and free of state that changes before backward.
    * ``fn`` returns a Tensor or ``(out, *extras)``; extras are taken from chunk 0, the others dropped.
    * ``num_chunks == 1`` is ``fn(x)``; otherwise ``1 <= num_chunks <= x.size(dim)``. Callers with
      collectives inside ``fn`` must pass the same ``num_chunks`` on every rank of the group.
    * ``recompute_fn`` (default ``fn``) runs in each chunk's recompute; it must save the same tensors
      as ``fn`` but may skip work backward never reads (an MLP's fc2 product).
    * ``outputs_unread=True`` (needs autograd recording) promises the result's values are never read,
      only back-propagated through: each chunk's forward then leaves every matrix product
      uncomputed (:class:`GemmsLeftEmpty`); docs/design.md#mlp-under-full-recompute.

    Raises ``ValueError`` / ``TypeError`` naming the bad argument or the non-per-token ``fn`` result.
    """
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"mini_sequence_apply: num_chunks must be an int >= 1, got {num_chunks!r}")
    if num_chunks == 1:
        return fn(x)

    record = torch.is_grad_enabled()
    if outputs_unread and not record:
        raise ValueError("mini_sequence_apply: outputs_unread=True needs autograd recording (the values "
                         "are left undefined, so only a graph that backward recomputes is of use)")
    # Without autograd, a detached alias: no_grad views of a requires-grad tensor trip module-input hooks.
    source = x if record else x.detach()
    chunks = torch.split(source, chunk_sizes(x.size(dim), num_chunks), dim=dim)

    outs = []
    extras = None
    for i, chunk in enumerate(chunks):
        if record:
            later = fn if recompute_fn is None else recompute_fn
            first = _without_gemms(later) if outputs_unread else fn
            run = first if first is later else _first_call_then(first, later)
            result = checkpoint(run, chunk, use_reentrant=False, preserve_rng_state=False)
        else:
            result = fn(chunk)
        out, chunk_extras = _split_output(result, i)
        if i == 0:
            extras = chunk_extras
        elif (chunk_extras is None) != (extras is None):
            raise TypeError(
                "mini_sequence_apply: fn returned a Tensor for some chunks and a tuple for others"
            )
        if out.size(dim) != chunk.size(dim):
            raise ValueError(
                f"mini_sequence_apply: fn changed the size along dim {dim} "
                f"({chunk.size(dim)} -> {out.size(dim)}); it must be per-token"
            )
        outs.append(out)
        del result, out, chunk_extras

    output = torch.cat(outs, dim=dim)
    del outs
    if extras is None:
        return output
    return (output, *extras)
