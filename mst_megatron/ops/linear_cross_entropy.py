"""Mini-sequence LM head fused with vocab-parallel cross-entropy: one ``[T/M, V_local]`` fp32 chunk of
logits at a time, gradients formed in forward and scaled by the upstream gradient in backward
(stock's three logits GEMMs; docs/design.md#lm-head-and-cross-entropy). Pure torch + torch.distributed.
"""

from typing import List, Optional

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake

from mst_megatron.ops.chunking import chunk_sizes

__all__ = ["linear_cross_entropy"]

# torch 2.13 renamed the single-tensor collectives (the old names warn); torch 2.6 has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _tp_rank_and_size(tp_group) -> tuple:
    """(rank, size) in ``tp_group``; ``None`` means no tensor parallelism."""
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _target_index(labels_c: torch.Tensor, vocab_start: int, logits_shape: torch.Size):
    """Where each label sits in a chunk's logits ``[blocks, c, block_cols]`` (this rank's vocab shard in
    equal blocks): the ``(block, row, column)`` index, clamped to 0 when off-shard, and the in-shard mask."""
    blocks, rows, block_cols = logits_shape
    local = labels_c - vocab_start
    in_range = (local >= 0) & (local < blocks * block_cols)
    local = local.masked_fill(~in_range, 0)
    return (local // block_cols, torch.arange(rows, device=local.device), local % block_cols), in_range


def _chunk_rows(hidden: torch.Tensor, start: int, end: int, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """Rows ``start:end`` of this rank's hidden states; under sequence parallelism those rows of every
    rank of ``tp_group``, rank after rank (the tokens' order in the gathered sequence)."""
    rows = hidden[start:end]
    if not sequence_parallel:
        return rows
    gathered = rows.new_empty((dist.get_world_size(tp_group) * rows.shape[0], rows.shape[1]))
    _all_gather_single(gathered, rows.contiguous(), group=tp_group)
    return gathered


def _sum_to_own_rows(grad_rows: torch.Tensor, tp_group) -> torch.Tensor:
    """Inverse of the gather in :func:`_chunk_rows` for gradients: each rank's block summed over the
    group (every rank computed a partial from its vocabulary shard), this rank's block returned."""
    own = grad_rows.new_empty((grad_rows.shape[0] // dist.get_world_size(tp_group), grad_rows.shape[1]))
    _reduce_scatter_single(own, grad_rows, group=tp_group)
    return own


def _subtract_onehot_(probs: torch.Tensor, index, in_range: torch.Tensor) -> torch.Tensor:
    """In place on ``[blocks, c, block_cols]``: ``probs - onehot(label)`` on this rank's shard, from
    :func:`_target_index` (labels of other shards: no change)."""
    return probs.index_put_(index, in_range.to(probs.dtype).neg_(), accumulate=True)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` (batched when 3-D) with ``acc`` in fp32 whatever the dtype of ``a`` and ``b``."""
    if acc.dtype == a.dtype:
        (acc.addmm_ if a.dim() == 2 else acc.baddbmm_)(a, b)
    else:
        acc.add_(torch.matmul(a, b))


def vocab_blocks(weight: torch.Tensor) -> int:
    """Equal blocks of the vocab shard for the batched chunk GEMMs: on a CPU the most, up to the thread
    count, that divide it (faster there: ``benchmarks/bench_lm_head.py --chunk-gemms``); else 1."""
    if weight.device.type != "cpu" or not weight.is_contiguous():
        return 1
    vocab = weight.shape[0]
    return max(n for n in range(1, torch.get_num_threads() + 1) if vocab % n == 0)


class _ChunkGemms:
    """A chunk's three GEMMs against the weight as ``[blocks, V_local/blocks, h]``, and the buffers every
    chunk reuses: ``fp32`` (logits, then their gradient) and, for 16-bit inputs, ``low`` (its operand)."""

    def __init__(self, rows: int, weight: torch.Tensor, blocks: int):
        self.weight = weight.unflatten(0, (blocks, -1))  # a view: blocks > 1 only for a contiguous weight
        self.fp32 = weight.new_empty(blocks * rows * self.weight.shape[1], dtype=torch.float32)
        self.low = None if weight.dtype == torch.float32 else torch.empty_like(self.fp32, dtype=weight.dtype)

    def _view(self, buffer: torch.Tensor, rows: int) -> torch.Tensor:
        blocks, block_cols, _ = self.weight.shape
        return buffer[: blocks * rows * block_cols].view(blocks, rows, block_cols)

    def logits(self, hidden_c: torch.Tensor) -> torch.Tensor:
        """``hidden_c W^T`` in fp32 as ``[blocks, c, V_local/blocks]``."""
        hidden_b = hidden_c.expand(self.weight.shape[0], *hidden_c.shape)
        logits = self._view(self.fp32, hidden_c.shape[0])
        if self.low is None:
            return torch.bmm(hidden_b, self.weight.transpose(1, 2), out=logits)
        low = self._view(self.low, hidden_c.shape[0])
        return logits.copy_(torch.bmm(hidden_b, self.weight.transpose(1, 2), out=low))

    def as_input_dtype(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """``grad_logits`` (a view of ``fp32``) in the GEMMs' dtype."""
        if self.low is None:
            return grad_logits
        return self._view(self.low, grad_logits.shape[1]).copy_(grad_logits)

    def hidden_grad(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """``grad_logits W``: ``[c, h]``."""
        return torch.bmm(grad_logits, self.weight).sum(0)

    def add_weight_grad(self, dw: torch.Tensor, grad_logits: torch.Tensor, hidden_c: torch.Tensor) -> None:
        """``dw += grad_logits^T hidden_c`` (``dw`` fp32, ``[V_local, h]``)."""
        blocks = self.weight.shape[0]
        _add_product(dw.view(self.weight.shape), grad_logits.transpose(1, 2), hidden_c.expand(blocks, *hidden_c.shape))


def _chunk_softmax(logits, labels_c, vocab_start: int, tp_group):
    """From one chunk's fp32 logits ``[blocks, c, V_local/blocks]``: ``(softmax over the global vocab
    restricted to this shard, lse [c], loss [c], the labels' target index)``; the softmax overwrites
    the logits."""
    target_index = _target_index(labels_c, vocab_start, logits.shape)
    index, in_range = target_index
    target = logits[index].masked_fill_(~in_range, 0.0)
    row_max = logits.amax(dim=(0, 2))
    if tp_group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    probs = logits.sub_(row_max.view(1, -1, 1)).exp_()
    stats = torch.stack((probs.sum(dim=(0, 2)), target))
    if tp_group is not None:  # one collective for both sums: off-shard ranks add 0 to the target
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)
    sum_exp, target = stats[0], stats[1]
    probs.div_(sum_exp.view(1, -1, 1))
    lse = sum_exp.log_().add_(row_max)
    return probs, lse, lse - target, target_index


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked ``logsumexp(h W^T) - (h W^T)[label]``, gradients formed in forward. Under SP the per-token
    vectors are ``[tp_size, rows per rank]`` and a chunk is the same columns of every row."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, sizes: List[int], tp_group, sequence_parallel: bool,
                with_grads: bool):
        tp_rank, tp_size = _tp_rank_and_size(tp_group)
        vocab_start = weight.shape[0] * tp_rank
        blocks = tp_size if sequence_parallel else 1
        labels = labels.long().reshape(blocks, -1)
        need_dh = with_grads and ctx.needs_input_grad[0]
        need_dw = with_grads and ctx.needs_input_grad[1]
        lse = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        loss = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        # dh before g: complete under SP (reduce-scattered per chunk), else this rank's vocab-shard partial.
        dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else None
        # dW sums over chunks in fp32, so 16-bit heads do not lose small per-chunk terms.
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None

        gemms = _ChunkGemms(blocks * max(sizes), weight, vocab_blocks(weight))
        start = 0
        for size in sizes:
            end = start + size
            hidden_c = _chunk_rows(hidden, start, end, tp_group, sequence_parallel)
            labels_c = labels[:, start:end].reshape(-1)
            probs, lse_c, loss_c, target_index = _chunk_softmax(gemms.logits(hidden_c), labels_c, vocab_start, tp_group)
            lse[:, start:end] = lse_c.view(blocks, -1)
            loss[:, start:end] = loss_c.view(blocks, -1)
            if need_dh or need_dw:
                grad_logits = gemms.as_input_dtype(_subtract_onehot_(probs, *target_index))
                if need_dh and sequence_parallel:
                    dh[start:end] = _sum_to_own_rows(gemms.hidden_grad(grad_logits), tp_group)
                elif need_dh:
                    dh[start:end] = gemms.hidden_grad(grad_logits)
                if need_dw:
                    gemms.add_weight_grad(dw, grad_logits, hidden_c)
            del hidden_c  # under SP a gathered chunk: freed before the next gather
            start = end

        # Only this rank's rows of hidden are kept: the correction in backward gathers a chunk again.
        ctx.save_for_backward(hidden, weight, labels, lse, dh, dw)
        ctx.sizes = sizes
        ctx.vocab_start = vocab_start
        ctx.tp_group, ctx.tp_rank, ctx.sequence_parallel = tp_group, tp_rank, sequence_parallel
        return loss.view(-1)

    @staticmethod
    def backward(ctx, grad_loss):
        if getattr(ctx, "backward_done", False):
            raise RuntimeError(
                "linear_cross_entropy's backward runs once per forward (its gradients are formed in "
                "forward and scaled in place): retain_graph / a second backward is not supported"
            )
        ctx.backward_done = True
        hidden, weight, labels, lse, dh, dw = ctx.saved_tensors
        g = grad_loss.float().view(lse.shape)
        if dh is not None:  # row i times g_i, computed in fp32 and rounded once to dh's dtype
            dh.mul_(g[ctx.tp_rank if ctx.sequence_parallel else 0].unsqueeze(1))
        if dw is not None and is_fake(g):
            # Fake tensors (simulation) have no values: counted as a uniform g (a mean loss), no correction.
            dw = dw.mul_(g.reshape(-1)[0]).to(weight.dtype)
        elif dw is not None:
            values, counts = torch.unique(g, return_counts=True)
            common = values[counts.argmax()]
            dw.mul_(common)
            differs = g != common  # the same on every TP rank, as g is: so are the gathers below
            start = 0
            for size in ctx.sizes:
                end = start + size
                rows = differs[:, start:end].reshape(-1).nonzero().squeeze(1)
                if rows.numel():
                    hidden_r = _chunk_rows(hidden, start, end, ctx.tp_group, ctx.sequence_parallel)[rows]
                    lse_r = lse[:, start:end].reshape(-1)[rows]
                    g_r = g[:, start:end].reshape(-1)[rows]
                    probs = torch.mm(hidden_r, weight.t()).float().sub_(lse_r.unsqueeze(1)).exp_().unsqueeze(0)
                    labels_r = labels[:, start:end].reshape(-1)[rows]
                    grad_logits = _subtract_onehot_(probs, *_target_index(labels_r, ctx.vocab_start, probs.shape))[0]
                    grad_logits.mul_((g_r - common).unsqueeze(1))
                    _add_product(dw, grad_logits.to(hidden.dtype).t(), hidden_r)
                    del probs, grad_logits, hidden_r
                start = end
            # dW is returned once, never also written to weight.grad.
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_chunks: int,
    tp_group: Optional["dist.ProcessGroup"] = None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Per-token loss ``[T]`` fp32: logsumexp over the global vocab minus the target logit.

    hidden ``[T, h]`` (float), weight ``[V_local, h]`` (rows ``V_local * tp_rank`` on of the global
    vocab, same dtype), labels ``[T]`` integer global ids; ``num_chunks`` near-equal chunks of T.
    Every rank of ``tp_group`` (None: no TP) must pass the same ``num_chunks`` and T, and backward the
    same upstream gradient. ``dh`` is this rank's partial (reduce it over TP outside). A label outside
    ``[0, V)`` gets target logit 0, as in megatron: mask it with the upstream gradient. Backward runs
    at most once per forward (``RuntimeError`` otherwise).

    ``sequence_parallel=True``: ``hidden`` is this rank's ``[T_local, h]`` of tokens sharded rank after
    rank; labels and loss cover all ``T = tp_size * T_local``; ``num_chunks`` splits the shard; ``dh``
    comes back complete. Bad shapes, dtypes or arguments raise ``ValueError`` / ``TypeError``.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [T, h], got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be 2-D [V_local, h] with h={hidden.shape[1]} (from hidden), "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if not isinstance(sequence_parallel, bool):
        raise TypeError(f"sequence_parallel must be a bool, got {sequence_parallel!r}")
    if tp_group is not None and not isinstance(tp_group, dist.ProcessGroup):
        raise TypeError(f"tp_group must be a torch.distributed ProcessGroup or None, got {tp_group!r}")
    if sequence_parallel and tp_group is None:
        raise ValueError("sequence_parallel=True needs the tensor-parallel tp_group its tokens are sharded over")
    T = hidden.shape[0] * (dist.get_world_size(tp_group) if sequence_parallel else 1)
    if labels.dim() != 1 or labels.shape[0] != T:
        source = "from hidden and the tp_group size" if sequence_parallel else "from hidden"
        raise ValueError(f"labels must be 1-D of length T={T} ({source}), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int):
        raise TypeError(f"num_chunks must be an int, got {num_chunks!r}")
    sizes = chunk_sizes(hidden.shape[0], num_chunks)
    return _LinearCrossEntropy.apply(hidden, weight, labels, sizes, tp_group, sequence_parallel,
                                     torch.is_grad_enabled())
