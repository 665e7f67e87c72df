"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``, for the MST layer spec.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward signature, no
parameters, so state dicts are unchanged) that never builds the ``[b, heads, s, s]`` score tensor:
SDPA dispatches to flash-style kernels on CPU and GPU that keep only the output and the per-row
log-sum-exp. Long mini-sequence runs need this; the stock local attention's scores grow as ``s^2``
and dominate memory long before the MLP does.

Supported: causal and unmasked self-attention; grouped-query attention (SDPA's ``enable_gqa``, K/V not
expanded, wherever the kernel SDPA picks supports it; otherwise K/V are expanded to the query heads,
which costs memory linear in s rather than a fall-back to the quadratic math kernel); attention
dropout drawn from the RNG stream ``DotProductAttention`` draws it from. Refused with a clear error:
other mask types, packed sequences, attention bias, sliding windows, non-vanilla softmax and context
parallelism (a later issue: it will wrap :meth:`SDPAttention._attend`, which sees one rank's queries
and the keys they attend to).

Memory caveat: torch's CPU flash kernel has no dropout, so with ``attention_dropout > 0`` on CPU SDPA
falls back to its math kernel, which does materialise the scores (a warning says so once). GPU kernels
support dropout.
"""

import contextlib
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

__all__ = ["SDPAttention"]

SUPPORTED_MASK_TYPES = (AttnMaskType.causal, AttnMaskType.no_mask)
_warned_cpu_dropout = False


class SDPAttention(MegatronModule):
    """Memory-efficient core attention: ``[sq, b, np, hn]`` queries, ``[sk, b, ng, hn]`` keys and
    values -> ``[sq, b, np * hn]`` context, like ``DotProductAttention``.

    ``attention_mask`` is ignored: the mask type implies the mask, as in Transformer Engine's attention
    (pass ``None``, or for causal attention megatron's left-to-right causal mask).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                f"context_parallel_size={config.context_parallel_size} is not supported yet by the MST "
                "core attention (SDPAttention); use context_parallel_size=1"
            )
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"softmax_type={config.softmax_type!r} is not supported by SDPAttention; use 'vanilla'"
            )
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError(
                f"window_size={config.window_size} (sliding-window attention) is not supported by "
                "SDPAttention; use window_size=None"
            )
        _check_mask_type(attn_mask_type)

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.pg_collection = pg_collection
        # None: 1/sqrt(head dim), resolved from the query in forward. megatron's
        # apply_query_key_layer_scaling divides the scale by layer_number and multiplies the scores
        # back before the softmax: the same math, so it needs no counterpart here.
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        """Attention over the full local sequence; returns ``[sq, b, np * hn]``."""
        if packed_seq_params is not None:
            raise ValueError("packed_seq_params (packed sequences) is not supported by SDPAttention")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPAttention")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        _check_mask_type(mask_type)
        causal = mask_type == AttnMaskType.causal
        if causal and query.size(0) != key.size(0):
            raise ValueError(
                f"causal SDPAttention needs as many queries as keys, got {query.size(0)} and {key.size(0)}"
            )

        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p == 0.0:
            return self._attend(query, key, value, causal, dropout_p)
        _warn_cpu_dropout(query)
        # Draw the mask where DotProductAttention does: from the tracker's model-parallel stream
        # (seeded per TP rank, whose heads differ), or the default stream under sequence parallelism.
        if self.config.sequence_parallel:
            rng = contextlib.nullcontext()
        else:
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        with rng:
            return self._attend(query, key, value, causal, dropout_p)

    def _attend(self, query, key, value, causal: bool, dropout_p: float) -> torch.Tensor:
        """SDPA on ``[s, b, heads, hn]`` tensors; context parallelism will hook in here."""
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(q.size(-1))
        gqa = q.size(1) != k.size(1)
        if gqa and _sdpa_backend(q, k, v, dropout_p, causal, scale) == SDPBackend.MATH.value:
            # Some fused kernels (e.g. older CUDA memory-efficient ones) lack native GQA: expanding
            # K/V (query-sized, linear in s) keeps them eligible instead of the quadratic math kernel.
            k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
            gqa = False
        context = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=gqa
        )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(context.size(2), context.size(0), -1)


def _sdpa_backend(q, k, v, dropout_p: float, causal: bool, scale: float) -> int:
    """The kernel SDPA would pick for grouped-query inputs (``SDPBackend`` value; torch's dispatcher
    query, private but stable since torch 2.0)."""
    return torch._fused_sdp_choice(q, k, v, None, dropout_p, causal, scale=scale, enable_gqa=True)


def _check_mask_type(mask_type: AttnMaskType) -> None:
    if mask_type not in SUPPORTED_MASK_TYPES:
        allowed = ", ".join(t.name for t in SUPPORTED_MASK_TYPES)
        raise ValueError(f"attn_mask_type={mask_type} is not supported by SDPAttention; allowed: {allowed}")


def _warn_cpu_dropout(query: torch.Tensor) -> None:
    global _warned_cpu_dropout
    if query.device.type == "cpu" and not _warned_cpu_dropout:
        _warned_cpu_dropout = True
        warnings.warn(
            "SDPAttention with attention dropout on CPU: torch's CPU flash kernel has no dropout, so "
            "SDPA uses its math kernel, which materialises the [b, heads, s, s] scores",
            stacklevel=3,
        )
