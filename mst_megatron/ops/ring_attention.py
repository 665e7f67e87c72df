"""Ring context parallelism for attention (megatron's ``cp_comm_type="p2p"``) as an autograd op: K/V
shards travel the ring, per-block flash kernels' outputs are merged by log-sum-exp, backward is exact.
Causal block schedule, kernels and communication: docs/design.md#ring. No dropout.
"""

import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["ring_attention"]

_aten = torch.ops.aten


# Kernel tensors are [b, heads, s, d]; the log-sum-exp is float32 [b, heads, s].


def _block_forward(q, k, v, causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """One block's attention output and log-sum-exp."""
    if q.device.type == "cpu":
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    k, v = _expand_kv(q, k, v)
    out, lse, _, _ = _aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    return out, lse[..., : q.size(2)]  # the kernel pads the log-sum-exp rows to its alignment


def _block_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """One block's ``(dq, dk, dv)`` given the *merged* output and log-sum-exp of its query rows."""
    if q.device.type == "cpu":
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=scale
        )
    kx, vx = _expand_kv(q, k, v)
    align = 32  # the efficient kernel's log-sum-exp row alignment
    padded = lse.new_zeros(*lse.shape[:-1], math.ceil(lse.size(-1) / align) * align)
    padded[..., : lse.size(-1)] = lse
    zero = torch.zeros((), dtype=torch.int64, device=q.device)  # philox seed/offset: unused without dropout
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        dout, q, kx, vx, None, out, padded, zero, zero, 0.0, [True, True, True, False], causal, scale=scale
    )
    groups = q.size(1) // k.size(1)
    if groups > 1:  # sum the expanded heads' gradients back onto their K/V group
        dk, dv = (t.unflatten(1, (k.size(1), groups)).sum(2) for t in (dk, dv))
    return dq, dk, dv


def _expand_kv(q, k, v):
    groups = q.size(1) // k.size(1)
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


class _Ring:
    """The ring neighbours of this rank in ``group`` and one step of shifting a buffer along it."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def shift(self, buf: torch.Tensor, into: torch.Tensor):
        """Post sending ``buf`` to the next rank and receiving the previous rank's into ``into`` (same
        shape); return ``wait``: after ``wait()`` ``into`` holds it and ``buf`` may be written again."""
        reqs = [dist.isend(buf, self.next, group=self.group), dist.irecv(into, self.prev, group=self.group)]

        def wait():
            for req in reqs:
                req.wait()
            reqs.clear()  # the requests hold their tensors

        return wait


class _Buffers:
    """The receive buffers of a ring loop: a buffer whose send has completed is received into again, so
    two travel at once, ``keep`` (a buffer never received into) aside."""

    def __init__(self, keep: Optional[torch.Tensor] = None):
        self.keep, self.spare = keep, None

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """A buffer to receive into: the spare one, else a new one like ``like``."""
        buf, self.spare = self.spare, None
        return torch.empty_like(like) if buf is None else buf

    def sent(self, buf: torch.Tensor) -> None:
        """``buf``'s send has completed: it becomes the spare, unless it is ``keep``."""
        if buf is not self.keep:
            self.spare = buf

    def drop(self) -> None:
        """Nothing more will be received: let the spare go."""
        self.spare = None


def _blocks(step_src: int, rank: int, causal: bool, half: int):
    """``(query rows, key columns, causal)`` of this step's block (slices of the local sequence); step 0
    (``step_src == rank``) covers every row and column."""
    everything = slice(None)
    if not causal:
        return everything, everything, False
    if step_src == rank:
        return everything, everything, True
    if step_src < rank:
        return everything, slice(0, half), False
    return slice(half, None), everything, False


def _merge(out, lse, rows, block_out, block_lse):
    """Fold a block's (output, log-sum-exp) into the running float32 ones, in place, on ``rows``
    (``block_out`` is overwritten)."""
    old = lse[:, :, rows]
    new = torch.logaddexp(old, block_lse)
    block_out.mul_(torch.exp(block_lse - new).unsqueeze(-1))
    out[:, :, rows].mul_(torch.exp(old - new).unsqueeze(-1)).add_(block_out)
    lse[:, :, rows] = new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, scale: float):
        ring = _Ring(group)
        half = q.size(2) // 2
        # One contiguous buffer travels, [2, b, kv_heads, s_local, d]; the local one is saved for backward
        # (not k and v, which may be views of a larger projection output that could then be freed).
        local = kv = torch.stack((k, v))
        buffers = _Buffers(keep=local)
        out = lse = None
        for step in range(ring.size):
            if step < ring.size - 1:
                kv_next = buffers.take(kv)
                wait = ring.shift(kv, kv_next)
            src = (ring.rank - step) % ring.size
            rows, cols, block_causal = _blocks(src, ring.rank, causal, half)
            block_out, block_lse = _block_forward(
                q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], block_causal, scale
            )
            if out is None:  # step 0 covers every query row
                out, lse = block_out.float(), block_lse.float()
            else:
                _merge(out, lse, rows, block_out.float(), block_lse.float())
            del block_out, block_lse  # before the next block's kernel allocates its own
            if step < ring.size - 1:
                wait()
                buffers.sent(kv)
                kv = kv_next
        out = out.to(q.dtype)
        ctx.save_for_backward(q, local, out, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.backward_done = group, causal, scale, False
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.backward_done:
            raise RuntimeError(
                "ring_attention's backward runs once per forward (the saved local K/V buffer receives the "
                "visiting shards): retain_graph / a second backward is not supported"
            )
        ctx.backward_done = True
        q, kv, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        half = q.size(2) // 2
        if dout.device.type != "cpu":  # the CPU kernel reads any strides
            dout = dout.contiguous()
        # The local K/V are sent on at step 0 and not read again: their buffer then receives.
        kv_buffers, dkv_buffers = _Buffers(), _Buffers()
        dq = dkv = dkv_wait = None  # dkv: the visiting shard's gradient so far, float32
        for step in range(ring.size):
            last = step == ring.size - 1
            if not last:
                kv_next = kv_buffers.take(kv)
                kv_wait = ring.shift(kv, kv_next)
            else:
                kv_buffers.drop()
            src = (ring.rank - step) % ring.size
            rows, cols, block_causal = _blocks(src, ring.rank, ctx.causal, half)
            bdq, bdk, bdv = _block_backward(
                dout[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                out[:, :, rows], lse[:, :, rows], block_causal, ctx.scale,
            )
            if dkv_wait is None:  # step 0: the block covers every row and column
                dq = bdq.float()
                dkv = torch.empty(kv.shape, dtype=torch.float32, device=kv.device)
                dkv[0], dkv[1] = bdk, bdv
            else:
                dq[:, :, rows] += bdq
                dkv_wait()  # the previous rank's partial gradient of this shard is in; ours went on
                dkv_buffers.sent(dkv)
                dkv = dkv_in
                dkv[0][:, :, cols] += bdk
                dkv[1][:, :, cols] += bdv
            del bdq, bdk, bdv  # before the next block's kernel allocates its own
            dkv_in = dkv_buffers.take(dkv)
            dkv_wait = ring.shift(dkv, dkv_in)
            if not last:
                kv_wait()
                kv_buffers.sent(kv)
                kv = kv_next
        dkv_wait()  # after cp hops the shard's gradient is back home, complete
        return dq.to(q.dtype), dkv_in[0].to(kv.dtype), dkv_in[1].to(kv.dtype), None, None, None


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of this rank's load-balanced sequence shard over the whole sequence of ``group``.

    ``query`` is ``[s/cp, b, heads, d]``, ``key`` and ``value`` ``[s/cp, b, kv_heads, d]`` (``heads``
    a multiple of ``kv_heads``), all this rank's two chunks; returns the context ``[s/cp, b, heads, d]``
    for the same positions. ``softmax_scale`` defaults to ``1/sqrt(d)``. Every rank of the group must
    call with the same shapes. Backward runs once per forward (a second one, after ``retain_graph``,
    raises ``RuntimeError``).
    """
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        raise ValueError(
            "ring_attention: expected [s, b, heads, d] query and equal [s, b, kv_heads, d] key and value, "
            f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    s, b, heads, d = query.shape
    if key.shape[0] != s or key.shape[1] != b or key.shape[3] != d or heads % key.size(2):
        raise ValueError(
            f"ring_attention: key/value {tuple(key.shape)} do not fit query {tuple(query.shape)} (same "
            "sequence, batch and head size; query heads a multiple of key/value heads)"
        )
    if causal and s % 2:
        raise ValueError(
            f"ring_attention: the local sequence length ({s}) must hold two equal chunks (the "
            "load-balanced layout), i.e. the global sequence length must be divisible by 2 x cp"
        )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
    context = _RingAttention.apply(q, k, v, group, causal, scale)
    return context.permute(2, 0, 1, 3)
