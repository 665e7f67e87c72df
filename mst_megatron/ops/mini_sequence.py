"""Mini-sequence application of a per-token function (pure torch, no megatron imports).

``mini_sequence_apply(fn, x, M)`` splits ``x`` into ``M`` mini-sequences, runs ``fn`` on each and
concatenates the results. With autograd recording, each chunk runs under
``torch.utils.checkpoint.checkpoint(use_reentrant=False, preserve_rng_state=False)``: forward keeps
only the chunk's input (a view of ``x``, so no extra storage) and its output; backward recomputes one
chunk at a time and frees that chunk's intermediates before the next chunk is recomputed. The peak of
``fn``'s intermediates therefore falls by about ``M`` in forward *and* in backward, at the cost of one
extra forward of ``fn`` (or of a cheaper ``recompute_fn`` that skips what backward never reads).

Why the stock non-reentrant checkpoint is enough (no custom ``autograd.Function``):

* Backward order: the autograd engine runs ready nodes in decreasing sequence number, and every node of
  chunk ``k`` was created after every node of chunk ``k-1``, so chunk ``M-1`` is recomputed and fully
  back-propagated, then chunk ``M-2``, and so on. Each chunk's recomputed tensors are held only by its
  checkpoint frame (weakly keyed by handles released on unpack, and by the chunk's saved-variable hooks),
  so they are freed as soon as that chunk's nodes have run. ``tests/test_ops_mini_sequence.py`` checks
  the peak with a memory tracker.
* It composes with an outer reentrant checkpoint (megatron's full recompute): the outer forward runs
  under ``no_grad`` (so this op only chunks), and during the outer recompute in backward this op
  checkpoints each chunk again, so the recompute's MLP working set is one chunk as well. When the op
  ends the outer checkpoint (its output values unread there), ``outputs_unread`` makes that outer
  recompute GEMM-free: the chunks compute only in their own recompute.
* It works when ``x`` does not require grad (only parameters do), unlike the reentrant variant.
* It restores the autocast state for the recompute.

Parameter gradients go through autograd as usual: every chunk's backward contributes to the same
``AccumulateGrad`` node, whose input buffer sums the ``M`` contributions, and the node then runs once
per backward. So ``.grad`` accumulation, post-accumulate-grad hooks and megatron DDP's grad-ready hook
fire once per step, exactly as in the unchunked model, whatever ``M`` is. (A layer that adds its
weight gradient into ``main_grad`` inside its own backward, like megatron's gradient-accumulation
fusion, does so once per chunk, which sums to the same result.)
"""

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
    """Inside it, matrix products (``mm``, ``addmm``, ``bmm``) return uninitialised tensors of their
    result's shape instead of computing it: for a recompute whose products nobody reads."""

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
    """Apply a per-token function ``fn`` (e.g. an MLP: fc1 -> act -> fc2, possibly with TP collectives
    inside) to ``x`` split into ``num_chunks`` mini-sequences along ``dim``, keeping only one chunk's
    intermediates alive in forward and in backward (each chunk is recomputed in backward).

    Contract:

    * ``fn(chunk)`` must be per-token along ``dim`` (output token ``i`` depends only on input token
      ``i``), so concatenating the chunk outputs equals ``fn(x)``. Its output must have the chunk's size
      along ``dim``.
    * ``fn`` returns either a Tensor, or a tuple ``(out, *extras)`` with ``out`` a Tensor. ``extras``
      (e.g. an un-added bias, or None) must be the same for every chunk: the ones returned by the first
      chunk are returned, the other chunks' are dropped unchecked.
    * The result has the same form: ``cat(outs, dim)`` or ``(cat(outs, dim), *extras_of_chunk_0)``.
    * ``fn`` must be deterministic: it is re-run in backward and the RNG state is *not* saved or
      restored (``preserve_rng_state=False``), so dropout inside ``fn`` would draw a different mask in
      the recompute. Megatron's MLP has no dropout.
    * ``fn`` must not depend on or mutate global state that changes between forward and backward.
    * ``num_chunks == 1`` calls ``fn(x)`` directly (the stock path, nothing recomputed). Otherwise
      ``1 <= num_chunks <= x.size(dim)`` is required; chunk sizes come from
      :func:`mst_megatron.ops.chunking.chunk_sizes` (near-equal, every token kept). Callers running
      collectives inside ``fn`` must pass the same ``num_chunks`` on every rank of the group.
    * ``recompute_fn`` (default ``fn``) runs instead of ``fn`` when a chunk is recomputed in backward.
      It must save the same tensors for backward as ``fn`` (the checkpoint matches them one by one)
      but may skip work whose result backward never reads: an MLP's last GEMM, whose output nothing
      differentiates through (its backward needs only its input and weight).
    * ``outputs_unread=True`` is the caller's promise that the result's *values* are never read, only
      back-propagated through (an MLP that ends a layer, in megatron's full-recompute pass: the
      layer's output only carries the graph into backward). Each chunk's forward then runs
      ``recompute_fn`` (default ``fn``) with every matrix product left uncomputed
      (:class:`GemmsLeftEmpty`): the result has the right shapes and autograd graph but undefined
      values, and costs no GEMM; backward recomputes each chunk for real, as always. It needs autograd
      recording and ``num_chunks > 1`` (``num_chunks == 1`` stays the plain call).
    * With autograd off (``torch.no_grad()``, inference mode, or inside the forward of megatron's
      reentrant full recompute), the chunks are run without checkpointing: this bounds the working set
      of ``fn`` to one chunk at no extra compute.

    Memory notes: the chunk outputs and their concatenation coexist briefly at the end of the forward
    (one extra output-sized buffer); in backward the per-chunk input gradients are gathered by
    ``torch.split``'s backward and concatenated (one extra input-sized buffer).
    """
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"mini_sequence_apply: num_chunks must be an int >= 1, got {num_chunks!r}")
    if num_chunks == 1:
        return fn(x)

    record = torch.is_grad_enabled()
    if outputs_unread and not record:
        raise ValueError("mini_sequence_apply: outputs_unread=True needs autograd recording (the values "
                         "are left undefined, so only a graph that backward recomputes is of use)")
    # With autograd off, split a detached alias: views of a requires-grad tensor made under no_grad
    # report requires_grad=True without a grad_fn, which trips hooks that inspect module inputs
    # (e.g. torch's ModTracker/MemTracker inside megatron's reentrant recompute forward).
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
