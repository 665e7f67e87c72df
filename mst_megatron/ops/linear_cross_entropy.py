"""Mini-sequence LM head fused with vocab-parallel cross-entropy.

The full logits ``[T, V/TP]`` (plus the fp32 copy and softmax a plain cross-entropy keeps) are the
largest activation of a long-sequence LM. This op never holds more than one chunk of logits: forward
keeps only the per-token fp32 logsumexp, and backward recomputes each chunk's logits from the saved
hidden states (one extra GEMM), so it stays exact for any upstream per-token gradient (loss masks,
any normalisation applied by the caller).

Pure torch + torch.distributed, so it can be tested without megatron-core.
"""

from typing import List, Optional

import torch
import torch.distributed as dist

from mst_megatron.ops.chunking import chunk_sizes

__all__ = ["linear_cross_entropy"]


def _tp_rank_and_size(tp_group) -> tuple:
    """(rank, size) in ``tp_group``; ``None`` means no tensor parallelism."""
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


def _local_targets(labels_c: torch.Tensor, vocab_start: int, vocab_local: int):
    """Column of each label in this rank's shard (clamped to 0 when off-shard) and the in-shard mask."""
    local = labels_c - vocab_start
    in_range = (local >= 0) & (local < vocab_local)
    return local.masked_fill(~in_range, 0).unsqueeze(1), in_range


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked ``logsumexp(h W^T) - (h W^T)[label]`` with recompute-in-backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, sizes: List[int], tp_group):
        tp_rank, tp_size = _tp_rank_and_size(tp_group)
        vocab_local = weight.shape[0]
        vocab_start = vocab_local * tp_rank
        labels = labels.long()
        T = hidden.shape[0]
        lse = torch.empty(T, dtype=torch.float32, device=hidden.device)
        loss = torch.empty(T, dtype=torch.float32, device=hidden.device)

        start = 0
        for size in sizes:
            end = start + size
            # GEMM in the input dtype; softmax statistics in fp32 (the fp32 copy is this chunk's only).
            logits = torch.mm(hidden[start:end], weight.t()).float()
            row_max = logits.amax(dim=1)
            if tp_size > 1:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
            idx, in_range = _local_targets(labels[start:end], vocab_start, vocab_local)
            target = logits.gather(1, idx).squeeze(1).masked_fill_(~in_range, 0.0)
            sum_exp = logits.sub_(row_max.unsqueeze(1)).exp_().sum(dim=1)
            # One collective for both sums: off-shard ranks contribute 0 to the target logit.
            stats = torch.stack((sum_exp, target))
            if tp_size > 1:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)
            lse_c = stats[0].log_().add_(row_max)
            lse[start:end] = lse_c
            loss[start:end] = lse_c - stats[1]
            del logits  # freed before the next chunk's GEMM: one chunk of logits alive at a time
            start = end

        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.sizes = sizes
        ctx.vocab_start = vocab_start
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        vocab_local = weight.shape[0]
        compute_dtype = hidden.dtype
        grad_loss = grad_loss.float()

        # dh is this rank's partial sum over its vocab shard; the caller reduces it over TP.
        dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else None
        # Chunks of dW are summed in fp32 so bf16/fp16 heads do not lose small per-chunk terms.
        dw_acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None

        start = 0
        for size in ctx.sizes:
            end = start + size
            hidden_c = hidden[start:end]
            # softmax - onehot, scaled per token by the upstream gradient, all in fp32.
            grad_logits = torch.mm(hidden_c, weight.t()).float()
            grad_logits.sub_(lse[start:end].unsqueeze(1)).exp_()
            idx, in_range = _local_targets(labels[start:end], ctx.vocab_start, vocab_local)
            grad_logits.scatter_add_(1, idx, in_range.to(grad_logits.dtype).neg_().unsqueeze(1))
            grad_logits.mul_(grad_loss[start:end].unsqueeze(1))
            grad_logits = grad_logits.to(compute_dtype)
            if need_dh:
                torch.mm(grad_logits, weight, out=dh[start:end])
            if need_dw:
                if dw_acc.dtype == compute_dtype:
                    dw_acc.addmm_(grad_logits.t(), hidden_c)
                else:
                    dw_acc.add_(torch.mm(grad_logits.t(), hidden_c))
            del grad_logits  # as in forward: one chunk of logits alive at a time
            start = end

        # dW is returned once and never also written to weight.grad (that doubled it in earlier MST code).
        dw = dw_acc.to(weight.dtype) if need_dw else None
        return dh, dw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_chunks: int,
    tp_group: Optional["dist.ProcessGroup"] = None,
) -> torch.Tensor:
    """hidden [T, h] (any float dtype), weight [V_local, h] (this rank's vocab shard, rows
    V_local*tp_rank ... V_local*(tp_rank+1)-1 of the global vocab), labels [T] int64 global ids.
    Returns the per-token loss [T] in fp32: logsumexp over the GLOBAL vocab minus the target logit.

    The T tokens are processed in ``num_chunks`` near-equal mini-sequences (none dropped); every rank
    of ``tp_group`` must pass the same ``num_chunks`` and T, since each chunk runs two collectives.
    ``dh`` is this rank's partial (reduce it over TP outside); ``tp_group=None`` means no TP. A label
    outside ``[0, V)`` (e.g. an ignore index) gets target logit 0, as in megatron's
    ``vocab_parallel_cross_entropy``: mask it with the upstream gradient.
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
    T = hidden.shape[0]
    if labels.dim() != 1 or labels.shape[0] != T:
        raise ValueError(f"labels must be 1-D of length T={T} (from hidden), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int):
        raise TypeError(f"num_chunks must be an int, got {num_chunks!r}")
    sizes = chunk_sizes(T, num_chunks)
    return _LinearCrossEntropy.apply(hidden, weight, labels, sizes, tp_group)
