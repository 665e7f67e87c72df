"""Ulysses CP as autograd ops: load-balanced sequence shards <-> head shards (docs/design.md#all-to-all)."""

import torch
import torch.distributed as dist

__all__ = ["sequence_to_heads", "heads_to_sequence", "load_balanced_order"]


def load_balanced_order(cp: int) -> torch.Tensor:
    """``[2 * cp]``: index of each natural-order chunk among the gathered chunks, where gathered chunk
    ``2 * r + h`` is natural chunk ``r`` (``h = 0``) or ``2 * cp - 1 - r`` (``h = 1``)."""
    return torch.tensor([2 * c if c < cp else 2 * (2 * cp - 1 - c) + 1 for c in range(2 * cp)])


class _AllToAll(torch.autograd.Function):
    """Block ``j`` of dim 0 goes to rank ``j`` (same shape on every rank); its own inverse, so backward too."""

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
    # [cp, s/cp, b, heads/cp, d]: block j holds rank j's heads.
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
