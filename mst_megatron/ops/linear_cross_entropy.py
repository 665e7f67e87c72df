"""Mini-sequence LM head fused with vocab-parallel cross-entropy.

The full logits ``[T, V/TP]`` (plus the fp32 copy and softmax a plain cross-entropy keeps) are the
largest activation of a long-sequence LM. This op never holds more than one chunk of logits: forward
keeps only the per-token fp32 logsumexp, and backward recomputes each chunk's logits from the saved
hidden states (one extra GEMM), so it stays exact for any upstream per-token gradient (loss masks,
any normalisation applied by the caller).

Under sequence parallelism each tensor-parallel rank holds a shard of the tokens and the vocabulary
needs all of them: the op all-gathers one chunk of the shards at a time (again in backward, where each
chunk's input gradient is reduce-scattered back), so no rank ever holds the gathered hidden states of
the whole sequence or their gradient.

Pure torch + torch.distributed, so it can be tested without megatron-core.
"""

from typing import List, Optional

import torch
import torch.distributed as dist

from mst_megatron.ops.chunking import chunk_sizes

__all__ = ["linear_cross_entropy", "DEFAULT_VOCAB_TILE"]

# Vocabulary columns per logits tile: with chunks of ~1K tokens a tile is 32 MiB in fp32, small next to
# the weight, and wide enough that the tile GEMMs run at full speed.
DEFAULT_VOCAB_TILE = 8192


# torch 2.13 renamed the single-tensor collectives (the old names warn); torch 2.6 has only the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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


def _vocab_tiles(vocab_local: int, vocab_tile: int) -> List[tuple]:
    """``(start, end)`` column ranges of at most ``vocab_tile`` columns covering this rank's shard."""
    return [(v, min(v + vocab_tile, vocab_local)) for v in range(0, vocab_local, vocab_tile)]


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in fp32 whatever the dtype of ``a`` and ``b``."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(torch.mm(a, b))


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked ``logsumexp(h W^T) - (h W^T)[label]`` with recompute-in-backward.

    This rank's rows of ``hidden`` go in ``sizes`` chunks. Under sequence parallelism each chunk is
    gathered from every rank of the TP group, so the per-token vectors (labels, loss, logsumexp) are
    viewed as ``[tp_size, rows per rank]`` and a chunk is the same columns of every row. Within a
    chunk the vocabulary shard goes in tiles of ``vocab_tile`` columns with a running (max, sum of
    exponentials) per token, so the logits alive at any time are one ``[chunk, tile]`` block. Tiling
    keeps that block small while chunks stay long enough for efficient GEMMs (each chunk streams the
    whole weight once).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, sizes: List[int], vocab_tile: int, tp_group, sequence_parallel: bool):
        tp_rank, tp_size = _tp_rank_and_size(tp_group)
        vocab_local = weight.shape[0]
        vocab_start = vocab_local * tp_rank
        tiles = _vocab_tiles(vocab_local, vocab_tile)
        blocks = tp_size if sequence_parallel else 1
        labels = labels.long().reshape(blocks, -1)
        lse = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        loss = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)

        start = 0
        for size in sizes:
            end = start + size
            hidden_c = _chunk_rows(hidden, start, end, tp_group, sequence_parallel)
            labels_c = labels[:, start:end].reshape(-1)
            rows = hidden_c.shape[0]
            row_max = torch.full((rows,), -float("inf"), dtype=torch.float32, device=hidden.device)
            sum_exp = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
            target = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
            for v0, v1 in tiles:
                # GEMM in the input dtype; softmax statistics in fp32 (the fp32 copy is this tile's only).
                logits = torch.mm(hidden_c, weight[v0:v1].t()).float()
                idx, in_range = _local_targets(labels_c, vocab_start + v0, v1 - v0)
                target += logits.gather(1, idx).squeeze(1).masked_fill_(~in_range, 0.0)
                new_max = torch.maximum(row_max, logits.amax(dim=1))
                sum_exp.mul_(row_max.sub_(new_max).exp_()).add_(logits.sub_(new_max.unsqueeze(1)).exp_().sum(dim=1))
                row_max = new_max
                del logits  # freed before the next GEMM: one tile of logits alive at a time
            if tp_size > 1:
                global_max = row_max.clone()
                dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
                sum_exp.mul_(row_max.sub_(global_max).exp_())
                row_max = global_max
                # One collective for both sums: off-shard ranks contribute 0 to the target logit.
                stats = torch.stack((sum_exp, target))
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)
                sum_exp, target = stats[0], stats[1]
            lse_c = sum_exp.log_().add_(row_max)
            lse[:, start:end] = lse_c.view(blocks, -1)
            loss[:, start:end] = (lse_c - target).view(blocks, -1)
            start = end

        # Only this rank's rows of hidden are kept: backward gathers each chunk again.
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.sizes = sizes
        ctx.tiles = tiles
        ctx.vocab_start = vocab_start
        ctx.tp_group = tp_group
        ctx.sequence_parallel = sequence_parallel
        return loss.view(-1)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        compute_dtype = hidden.dtype
        grad_loss = grad_loss.float().reshape(lse.shape)

        # Each rank's dh is its partial sum over its vocab shard: reduce-scattered here per chunk under
        # sequence parallelism, else reduced over TP by the caller. Sums over tiles, chunks and ranks
        # run in fp32, so bf16/fp16 heads do not lose small per-tile terms.
        dh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else None
        dw_acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None

        start = 0
        for size in ctx.sizes:
            end = start + size
            hidden_c = _chunk_rows(hidden, start, end, ctx.tp_group, ctx.sequence_parallel)
            labels_c = labels[:, start:end].reshape(-1)
            lse_c = lse[:, start:end].reshape(-1, 1)
            grad_c = grad_loss[:, start:end].reshape(-1, 1)
            dh_c = torch.zeros(hidden_c.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
            for v0, v1 in ctx.tiles:
                weight_t = weight[v0:v1]
                # softmax - onehot, scaled per token by the upstream gradient, all in fp32.
                grad_logits = torch.mm(hidden_c, weight_t.t()).float()
                grad_logits.sub_(lse_c).exp_()
                idx, in_range = _local_targets(labels_c, ctx.vocab_start + v0, v1 - v0)
                grad_logits.scatter_add_(1, idx, in_range.to(grad_logits.dtype).neg_().unsqueeze(1))
                grad_logits.mul_(grad_c)
                grad_logits = grad_logits.to(compute_dtype)
                if need_dh:
                    _add_product(dh_c, grad_logits, weight_t)
                if need_dw:
                    _add_product(dw_acc[v0:v1], grad_logits.t(), hidden_c)
                del grad_logits  # as in forward: one tile of logits alive at a time
            if need_dh:
                dh[start:end] = _sum_to_own_rows(dh_c, ctx.tp_group) if ctx.sequence_parallel else dh_c
            start = end

        # dW is returned once and never also written to weight.grad (that doubled it in earlier MST code).
        dw = dw_acc.to(weight.dtype) if need_dw else None
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_chunks: int,
    tp_group: Optional["dist.ProcessGroup"] = None,
    vocab_tile: int = DEFAULT_VOCAB_TILE,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """hidden [T_local, h] (any float dtype), weight [V_local, h] (this rank's vocab shard, rows
    V_local*tp_rank ... V_local*(tp_rank+1)-1 of the global vocab), labels [T] int64 global ids.
    Returns the per-token loss [T] in fp32: logsumexp over the GLOBAL vocab minus the target logit.

    Without ``sequence_parallel``, ``T = T_local`` (every rank of ``tp_group`` passes the same
    tokens) and ``dh`` is this rank's partial: reduce it over TP outside. With it, the tokens are
    sharded over ``tp_group`` rank-major: ``hidden`` is this rank's shard, tokens ``rank * T_local``
    ... ``(rank + 1) * T_local - 1`` of the ``T = tp_size * T_local`` that ``labels`` and the loss
    cover (the same on every rank), and ``dh`` is complete (summed over TP here, chunk by chunk).

    This rank's ``T_local`` rows are processed in ``num_chunks`` near-equal mini-sequences (none
    dropped; under sequence parallelism each is gathered from every rank), and each chunk's logits in
    tiles of at most ``vocab_tile`` vocabulary columns. Every rank of ``tp_group`` must pass the same
    ``num_chunks`` and ``T_local``, since each chunk runs collectives; ``tp_group=None`` means no TP.
    A label outside ``[0, V)`` (e.g. an ignore index) gets target logit 0, as in megatron's
    ``vocab_parallel_cross_entropy``: mask it with the upstream gradient.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [T_local, h], got shape {tuple(hidden.shape)}")
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
    if sequence_parallel and tp_group is None:
        raise ValueError("sequence_parallel=True needs tp_group, the group the tokens are sharded over")
    T_local = hidden.shape[0]
    blocks = _tp_rank_and_size(tp_group)[1] if sequence_parallel else 1
    T = T_local * blocks
    if labels.dim() != 1 or labels.shape[0] != T:
        where = f"hidden's {T_local} rows x {blocks} ranks of tp_group" if sequence_parallel else "hidden"
        raise ValueError(f"labels must be 1-D of length T={T} (from {where}), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int):
        raise TypeError(f"num_chunks must be an int, got {num_chunks!r}")
    if isinstance(vocab_tile, bool) or not isinstance(vocab_tile, int) or vocab_tile < 1:
        raise ValueError(f"vocab_tile must be an int >= 1, got {vocab_tile!r}")
    sizes = chunk_sizes(T_local, num_chunks)
    return _LinearCrossEntropy.apply(hidden, weight, labels, sizes, vocab_tile, tp_group, sequence_parallel)
