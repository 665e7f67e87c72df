"""Mini-sequence LM head: megatron's output ``ColumnParallelLinear`` that, given labels, returns the
per-token loss without holding the logits (docs/design.md#lm-head-and-cross-entropy)."""

from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig

from mst_megatron.layout import head_chunk_count
from mst_megatron.ops.chunking import AUTO, ChunkCount, validate_chunk_count
from mst_megatron.ops.linear_cross_entropy import WeightGradSum, linear_cross_entropy

__all__ = ["MiniSequenceLMHead", "check_head_options"]

PARAM = "lm_head_mini_sequences"


def check_head_options(config: TransformerConfig, mini_sequences: ChunkCount) -> ChunkCount:
    """Validate ``lm_head_mini_sequences`` and the config for the mini-sequence head; return the count."""
    mini_sequences = validate_chunk_count(mini_sequences, PARAM)
    if config.defer_embedding_wgrad_compute:
        raise ValueError(
            "config.defer_embedding_wgrad_compute=True keeps every micro-batch's full logits gradient "
            "for a deferred weight-gradient GEMM, which the mini-sequence LM head exists to avoid; "
            "set defer_embedding_wgrad_compute=False"
        )
    return mini_sequences


class MiniSequenceLMHead(ColumnParallelLinear):
    """``ColumnParallelLinear`` whose ``forward(..., labels=...)`` returns the per-token loss ``[b, s]``.

    ``mini_sequences``: int >= 1 or ``"auto"`` (:func:`mst_megatron.layout.head_chunk_count`), from
    shapes equal on every TP rank. Without labels: the stock layer, bit for bit.

    With labels, when the weight has an fp32 ``main_grad`` (megatron DDP's gradient buffer), its
    gradient is added straight into it, as megatron's gradient-accumulation fusion does
    (:meth:`main_grad_sum`): no ``V/TP x h`` fp32 sum of the head's own.
    """

    mini_sequences: ChunkCount  # set by adopt()
    _main_grad_sum: Optional[WeightGradSum]  # set by adopt(), reused while main_grad is the same

    @classmethod
    def adopt(cls, layer: ColumnParallelLinear, mini_sequences: ChunkCount = AUTO) -> "MiniSequenceLMHead":
        """Promote megatron's own bias-free output layer to this class in place (weight, attributes and
        state-dict keys kept) and return it; ``TypeError``/``ValueError`` for another layer."""
        if type(layer) is not ColumnParallelLinear:
            raise TypeError(f"layer must be a megatron ColumnParallelLinear, got {type(layer).__name__}")
        if layer.bias is not None:
            raise ValueError("layer must have no bias (GPTModel builds its output layer with bias=False)")
        mini_sequences = check_head_options(layer.config, mini_sequences)
        layer.__class__ = cls
        layer.mini_sequences = mini_sequences
        layer._main_grad_sum = None
        return layer

    def num_chunks(self, local_tokens: int) -> int:
        """Mini-sequences of this rank's ``local_tokens`` tokens (its sequence-parallel shard, if any)."""
        sp_size = self.tp_group.size() if self.sequence_parallel else 1
        return head_chunk_count(self.mini_sequences, local_tokens, sp_size, self.input_size,
                                self.output_size_per_partition)

    def forward(
        self,
        input_: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        runtime_gather_output: Optional[bool] = None,
        labels: Optional[torch.Tensor] = None,
    ):
        """Without ``labels``: the stock ``(logits, bias)``. With ``labels``: ``(loss [b, s] fp32, None)``,
        from the vocab-parallel logits whatever ``runtime_gather_output`` (megatron issue 7452)."""
        if labels is None:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        return self.per_token_loss(input_, labels, weight), None

    def per_token_loss(
        self, input_: torch.Tensor, labels: torch.Tensor, weight: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """input_ ``[s_local, b, h]`` (``s_local = s / TP`` under sequence parallelism), labels ``[b, s]``
        global token ids in ``[0, vocab)``; returns the per-token loss ``[b, s]`` in fp32."""
        weight = self._head_weight(weight)
        self._check_labels(input_, labels)
        # Under SP the op returns the complete dh; otherwise the region all-reduces its partial over TP.
        hidden = input_ if self.sequence_parallel else copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        s_local, b, h = hidden.shape
        # Row i * b + j is position i of sequence j (labels transposed); under SP, TP shards in rank order.
        loss = linear_cross_entropy(
            hidden.reshape(s_local * b, h),
            weight,
            labels.t().reshape(-1),
            self.num_chunks(s_local * b),
            tp_group=self.tp_group,
            sequence_parallel=self.sequence_parallel,
            weight_grad_sum=self.main_grad_sum(weight),
        )
        return loss.view(labels.shape[1], b).t().contiguous()

    def main_grad_sum(self, weight: torch.Tensor) -> Optional[WeightGradSum]:
        """Where the op adds ``weight``'s gradient: its ``main_grad`` when that is an fp32 buffer of
        its shape (megatron DDP), else ``None`` (the op's own sum, returned as the gradient).

        Megatron's convention for a gradient already in ``main_grad`` (``tensor_parallel/layers.py``,
        gradient-accumulation fusion): backward returns a placeholder gradient, zeros when
        ``zero_out_wgrad`` (a weight tied to the embedding on the same stage, whose own gradient is
        added to it) else uninitialised, and sets ``grad_added_to_main_grad`` so that DDP's hook adds
        nothing but the embedding's share and still marks the parameter ready. One object per
        ``main_grad``, so its expected upstream value carries over micro-batches and steps.
        """
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is None or main_grad.dtype != torch.float32 or main_grad.shape != weight.shape:
            return None
        if self._main_grad_sum is None or self._main_grad_sum.buffer is not main_grad:
            self._main_grad_sum = WeightGradSum(main_grad, returned_grad=lambda: _placeholder_grad(weight))
        return self._main_grad_sum

    def _head_weight(self, weight: Optional[torch.Tensor]) -> torch.Tensor:
        """The weight to use: ``weight`` (tied embeddings) or the layer's own, as the stock forward."""
        if weight is None:
            if self.weight is None:
                raise RuntimeError(
                    "weight must be passed to the LM head: it has none of its own (tied embeddings)"
                )
            return self.weight
        expected = (self.output_size_per_partition, self.input_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"weight must have shape {expected} (V/TP, h), got {tuple(weight.shape)}")
        return weight

    def _check_labels(self, input_: torch.Tensor, labels: torch.Tensor) -> None:
        if input_.dim() != 3:
            raise ValueError(f"input_ must be [s, b, h], got shape {tuple(input_.shape)}")
        s_local, b, _ = input_.shape
        s = s_local * (self.tp_group.size() if self.sequence_parallel else 1)
        if tuple(labels.shape) != (b, s):
            raise ValueError(
                f"labels must have the shape of the input ids [b, s] = [{b}, {s}] (from the hidden "
                f"state [s, b, h]), got {list(labels.shape)}"
            )
        # Range check once per forward (the op gives a bad label target logit 0); fake tensors have no values.
        if is_fake(labels):
            return
        low, high = torch.stack(torch.aminmax(labels)).tolist()
        if low < 0 or high >= self.output_size:
            raise ValueError(
                f"labels must be token ids in [0, {self.output_size}) (the vocab size), got values in "
                f"[{low}, {high}]"
            )


def _placeholder_grad(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """What backward returns for a weight whose gradient is already in ``main_grad`` (see
    :meth:`MiniSequenceLMHead.main_grad_sum`); ``None`` without DDP's ``grad_added_to_main_grad``."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(weight.shape, dtype=weight.dtype, device=weight.device)
