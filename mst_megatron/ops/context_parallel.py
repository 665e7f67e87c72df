"""Ulysses context parallelism as pure autograd ops (no megatron imports; the group is passed in).

Under context parallelism (CP) each of the ``cp`` ranks of a group holds one shard of the sequence.
Attention needs every key for every query, so around the core attention two all-to-alls trade the
sequence shards for head shards and back (the approach of DeepSpeed-Ulysses, which the MST paper
used): :func:`sequence_to_heads` turns this rank's ``[s/cp, b, heads, d]`` into the whole sequence for
``heads/cp`` of the heads, ``[s, b, heads/cp, d]``, and :func:`heads_to_sequence` is its inverse. In
between, attention is ordinary full-sequence attention on fewer heads, so the per-rank activation
memory of attention is ``1/cp`` of the single-rank one and no score tensor ever crosses ranks.

Load-balanced layout (megatron's ``get_batch_on_this_cp_rank``): the sequence is cut into ``2 * cp``
equal chunks and rank ``r`` holds chunks ``r`` and ``2 * cp - 1 - r``, so every rank gets as much of
the causal triangle as any other. :func:`sequence_to_heads` puts the gathered chunks back into natural
order (a causal mask is then the plain lower triangle) and :func:`heads_to_sequence` restores the
layout. Both ops are permutations of elements, so each one's backward is the other.

The exchange is ``torch.distributed.all_to_all_single``, which NCCL and gloo both implement (gloo for
CPU tensors), on equal-sized blocks: every rank of the group must call with the same shape.
"""

import torch
import torch.distributed as dist

__all__ = ["sequence_to_heads", "heads_to_sequence", "load_balanced_order"]


def load_balanced_order(cp: int) -> torch.Tensor:
    """Index of each natural-order chunk among the gathered ``(rank, half)`` chunks, ``2 * cp`` long.

    Gathered chunk ``2 * r + h`` is half ``h`` of rank ``r``'s shard, i.e. natural chunk ``r`` for
    ``h = 0`` and ``2 * cp - 1 - r`` for ``h = 1``.
    """
    return torch.tensor([2 * c if c < cp else 2 * (2 * cp - 1 - c) + 1 for c in range(2 * cp)])


class _AllToAll(torch.autograd.Function):
    """Block ``j`` of dim 0 goes to rank ``j``; block ``j`` of the result came from rank ``j``.

    Exchanging equal blocks is its own inverse, so backward is the same exchange of the gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()  # the exchange splits memory order; empty_like then keeps it
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.group), None


def _check(x: torch.Tensor, what: str, divisors: dict) -> None:
    """``x`` is ``[s, b, heads, d]`` and each named dimension divides by its divisor."""
    if x.dim() != 4:
        raise ValueError(f"{what}: expected a [s, b, heads, d] tensor, got shape {tuple(x.shape)}")
    for (name, dim), divisor in divisors.items():
        if x.size(dim) % divisor:
            raise ValueError(f"{what}: {name} ({x.size(dim)}) must be divisible by {divisor}")


def sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """``[s/cp, b, heads, d]`` (this rank's load-balanced shard) -> ``[s, b, heads/cp, d]`` in natural
    sequence order, holding heads ``[r * heads/cp, (r + 1) * heads/cp)`` on rank ``r``."""
    cp = dist.get_world_size(group)
    _check(x, "sequence_to_heads", {("heads", 2): cp, ("local sequence length (two chunks per rank)", 0): 2})
    s_local, b, heads, d = x.shape
    # [s/cp, b, cp, heads/cp, d] -> [cp, s/cp, b, heads/cp, d]: block j holds rank j's heads.
    blocks = x.reshape(s_local, b, cp, heads // cp, d).permute(2, 0, 1, 3, 4)
    gathered = _AllToAll.apply(blocks, group)  # block j: rank j's shard of this rank's heads
    chunks = gathered.reshape(2 * cp, s_local // 2, b, heads // cp, d)
    natural = chunks.index_select(0, load_balanced_order(cp).to(x.device))
    return natural.reshape(cp * s_local, b, heads // cp, d)


def heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of :func:`sequence_to_heads`: ``[s, b, heads/cp, d]`` -> ``[s/cp, b, heads, d]``."""
    cp = dist.get_world_size(group)
    _check(x, "heads_to_sequence", {("sequence length (two chunks per rank)", 0): 2 * cp})
    s, b, local_heads, d = x.shape
    chunks = x.reshape(2 * cp, s // (2 * cp), b, local_heads, d)
    layout = chunks.index_select(0, torch.argsort(load_balanced_order(cp)).to(x.device))
    blocks = layout.reshape(cp, s // cp, b, local_heads, d)
    scattered = _AllToAll.apply(blocks, group)  # block j: this rank's shard of rank j's heads
    return scattered.permute(1, 2, 0, 3, 4).reshape(s // cp, b, cp * local_heads, d)
