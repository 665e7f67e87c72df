"""Mini-sequence LM head fused with vocab-parallel cross-entropy: one ``[T/M, V_local]`` fp32 chunk of
logits at a time, gradients formed in forward and scaled by the upstream gradient in backward
(stock's three logits GEMMs; docs/design.md#lm-head-and-cross-entropy). Pure torch + torch.distributed.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake

from mst_megatron.ops.chunking import chunk_sizes

__all__ = ["WeightGradSum", "linear_cross_entropy"]

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


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``acc += alpha * a @ b`` (batched when 3-D) with ``acc`` in fp32 whatever the dtype of ``a`` and
    ``b``."""
    if acc.dtype == a.dtype:
        (acc.addmm_ if a.dim() == 2 else acc.baddbmm_)(a, b, alpha=alpha)
    else:
        acc.add_(torch.matmul(a, b), alpha=alpha)


@dataclass
class WeightGradSum:
    """A caller's fp32 accumulator that :func:`linear_cross_entropy` adds the weight gradient into,
    instead of keeping its own ``[V_local, h]`` fp32 sum and returning it (e.g. a DDP ``main_grad``).

    ``buffer``: fp32, contiguous, the weight's shape and device. After backward it holds what it held
    before forward plus ``sum_i g_i a_i^T h_i`` (``g`` the upstream gradient): exact for any ``g``.
    Forward already adds that sum scaled by ``expected_grad`` (the upstream value expected for most
    tokens; 0 adds nothing), so a forward with gradients whose backward never runs leaves that partial
    sum in ``buffer``. Backward adds ``(g_i - expected_grad) a_i^T h_i`` for the tokens whose ``g_i``
    differs, recomputing their logits, then calls :meth:`observe` with the most common value of ``g``.
    Logits-sized GEMMs per chunk: 3 when the expected value is right for all tokens (as without a
    buffer), 2 + 2 when it is 0 (fewer when tokens have ``g_i = 0``), 3 + 2 when it is wrong.
    ``returned_grad``: called once in backward; its result is returned as the weight's gradient (a
    placeholder a framework's hooks expect, or ``None``: nothing reaches ``weight.grad``).
    ``last_common_grad``: the most common upstream value of the last backward (``None`` before one).
    """

    buffer: torch.Tensor
    expected_grad: float = 0.0
    returned_grad: Callable[[], Optional[torch.Tensor]] = lambda: None
    last_common_grad: Optional[float] = None

    def observe(self, common_grad: float) -> None:
        """After a backward whose most common upstream value was ``common_grad``: expect it in the next
        forward when the backward before had it too (a mean loss over a fixed token count), else
        expect 0, so that an upstream value that changes every micro-batch (a count of unmasked tokens
        that varies) costs the 2 + 2 GEMMs, not 3 + 2."""
        self.expected_grad = common_grad if common_grad == self.last_common_grad else 0.0
        self.last_common_grad = common_grad

    def check(self, weight: torch.Tensor) -> None:
        """``ValueError`` unless ``buffer`` can take ``weight``'s gradient."""
        buffer = self.buffer
        if (buffer.dtype != torch.float32 or tuple(buffer.shape) != tuple(weight.shape)
                or buffer.device != weight.device or not buffer.is_contiguous()):
            raise ValueError(
                f"weight_grad_sum.buffer must be a contiguous fp32 tensor of the weight's shape "
                f"{tuple(weight.shape)} on {weight.device}, got {buffer.dtype} {tuple(buffer.shape)} "
                f"on {buffer.device} (contiguous: {buffer.is_contiguous()})"
            )


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

    def add_weight_grad(self, dw: torch.Tensor, grad_logits: torch.Tensor, hidden_c: torch.Tensor,
                        scale: float = 1.0) -> None:
        """``dw += scale * grad_logits^T hidden_c`` (``dw`` fp32 contiguous, ``[V_local, h]``)."""
        blocks = self.weight.shape[0]
        _add_product(dw.view(self.weight.shape), grad_logits.transpose(1, 2),
                     hidden_c.expand(blocks, *hidden_c.shape), scale)


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


_FAKE_MEAN_GRAD = 1.0  # under fake tensors, the stand-in for a mean loss's upstream value


def _most_common(g: torch.Tensor) -> torch.Tensor:
    """The most frequent value of ``g`` (0-d tensor)."""
    values, counts = torch.unique(g, return_counts=True)
    return values[counts.argmax()]


def _add_corrections(ctx, saved, dw: torch.Tensor, g: torch.Tensor, common, every_token: bool = False) -> None:
    """``dw += sum_{i: g_i != common} (g_i - common) a_i^T h_i``, recomputing those tokens' logits from
    ``saved`` = forward's (hidden rows, weight, labels, log-sum-exps) (``dw`` fp32 ``[V_local, h]``,
    ``g`` ``[blocks, rows]``). ``every_token``: take every token as differing, without reading ``g``
    (fake tensors)."""
    hidden, weight, labels, lse = saved
    differs = None if every_token else g != common  # the same on every TP rank, as g is: so are the gathers
    start = 0
    for size in ctx.sizes:
        end = start + size
        if every_token:
            rows = torch.arange(labels[:, start:end].numel(), device=g.device)
        else:
            rows = differs[:, start:end].reshape(-1).nonzero().squeeze(1)
        if every_token or rows.numel():
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


def _add_to_weight_grad_sum(ctx, saved, g: torch.Tensor) -> Optional[torch.Tensor]:
    """Backward's part with a :class:`WeightGradSum`: forward added ``dw_scale x`` the weight gradient
    to its buffer; add the tokens whose ``g`` differs, observe ``g``'s common value, return the placeholder."""
    weight_grad_sum = ctx.weight_grad_sum
    if is_fake(g):  # no values (simulation): a mean loss, whose one value repeats every backward
        if ctx.dw_scale == 0.0:  # nothing expected: every token's term is added here, as for real
            _add_corrections(ctx, saved, ctx.grad_buffer, g, 0.0, every_token=True)
        weight_grad_sum.observe(_FAKE_MEAN_GRAD)
    else:
        _add_corrections(ctx, saved, ctx.grad_buffer, g, ctx.dw_scale)
        weight_grad_sum.observe(_most_common(g).item())
    return weight_grad_sum.returned_grad()


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked ``logsumexp(h W^T) - (h W^T)[label]``, gradients formed in forward. Under SP the per-token
    vectors are ``[tp_size, rows per rank]`` and a chunk is the same columns of every row."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, sizes: List[int], tp_group, sequence_parallel: bool,
                with_grads: bool, weight_grad_sum: Optional[WeightGradSum]):
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
        # dW sums over chunks in fp32, so 16-bit heads do not lose small per-chunk terms: in the
        # caller's buffer, scaled by the expected upstream gradient, or in
        # its own and scaled in backward.
        dw, dw_scale = None, 1.0
        if need_dw and weight_grad_sum is not None:
            dw_scale = weight_grad_sum.expected_grad
            dw = weight_grad_sum.buffer if dw_scale != 0.0 else None
        elif need_dw:
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

        gemms = _ChunkGemms(blocks * max(sizes), weight, vocab_blocks(weight))
        start = 0
        for size in sizes:
            end = start + size
            hidden_c = _chunk_rows(hidden, start, end, tp_group, sequence_parallel)
            labels_c = labels[:, start:end].reshape(-1)
            probs, lse_c, loss_c, target_index = _chunk_softmax(gemms.logits(hidden_c), labels_c, vocab_start, tp_group)
            lse[:, start:end] = lse_c.view(blocks, -1)
            loss[:, start:end] = loss_c.view(blocks, -1)
            if need_dh or dw is not None:
                grad_logits = gemms.as_input_dtype(_subtract_onehot_(probs, *target_index))
                if need_dh and sequence_parallel:
                    dh[start:end] = _sum_to_own_rows(gemms.hidden_grad(grad_logits), tp_group)
                elif need_dh:
                    dh[start:end] = gemms.hidden_grad(grad_logits)
                if dw is not None:
                    gemms.add_weight_grad(dw, grad_logits, hidden_c, dw_scale)
            del hidden_c  # under SP a gathered chunk: freed before the next gather
            start = end

        # Only this rank's rows of hidden are kept: the correction in backward gathers a chunk again.
        ctx.weight_grad_sum = weight_grad_sum if need_dw else None
        if ctx.weight_grad_sum is not None:  # the caller's buffer is not saved: backward adds to it
            ctx.grad_buffer, ctx.dw_scale, dw = weight_grad_sum.buffer, dw_scale, None
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
        if ctx.weight_grad_sum is not None:
            return dh, _add_to_weight_grad_sum(ctx, (hidden, weight, labels, lse), g), None, None, None, None, None, None
        if dw is not None and is_fake(g):
            # Fake tensors (simulation) have no values: counted as a uniform g (a mean loss), no correction.
            dw = dw.mul_(g.reshape(-1)[0]).to(weight.dtype)
        elif dw is not None:
            common = _most_common(g)
            dw.mul_(common)
            _add_corrections(ctx, (hidden, weight, labels, lse), dw, g, common)
            # dW is returned once, never also written to weight.grad.
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_chunks: int,
    tp_group: Optional["dist.ProcessGroup"] = None,
    sequence_parallel: bool = False,
    weight_grad_sum: Optional[WeightGradSum] = None,
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
    comes back complete.

    ``weight_grad_sum``: a :class:`WeightGradSum` whose fp32 buffer receives the weight gradient (added
    in forward and corrected in backward, see there); backward then returns its ``returned_grad()`` as
    the weight's gradient and no ``[V_local, h]`` fp32 sum of the op's own exists. ``None``: the op
    keeps that sum from forward to backward and returns it in the weight's dtype.

    Bad shapes, dtypes or arguments raise ``ValueError`` / ``TypeError``.
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
    if weight_grad_sum is not None:
        if not isinstance(weight_grad_sum, WeightGradSum):
            raise TypeError(f"weight_grad_sum must be a WeightGradSum or None, got {weight_grad_sum!r}")
        weight_grad_sum.check(weight)
    sizes = chunk_sizes(hidden.shape[0], num_chunks)
    return _LinearCrossEntropy.apply(hidden, weight, labels, sizes, tp_group, sequence_parallel,
                                     torch.is_grad_enabled(), weight_grad_sum)
