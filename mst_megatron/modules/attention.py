"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` for the MST layer spec: a
drop-in for ``DotProductAttention`` (no parameters) that never builds the ``[b, heads, s, s]`` scores.

Supported: causal and unmasked self-attention, grouped-query attention, attention dropout (not with
the ring), context parallelism with ``cp_comm_type`` ``"a2a"`` (default; ``None`` is taken as it),
``"p2p"`` and ``"a2a+p2p"``. Refused with a ``ValueError``: other mask types, packed sequences,
attention bias, sliding windows, non-vanilla softmax. Design: docs/design.md#attention and
docs/design.md#context-parallelism.
"""

import contextlib
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
import dataclasses

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from mst_megatron.layout import ParallelLayout
from mst_megatron.ops.context_parallel import heads_to_sequence, sequence_to_heads
from mst_megatron.ops.ring_attention import ring_attention

__all__ = ["SDPAttention", "ConfigSelfAttention"]

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
        # None: 1/sqrt(head dim). apply_query_key_layer_scaling is the same math, so it needs nothing here.
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # CP: all-to-all group, ring group (None: not used) and K/V replication before the all-to-all.
        self.a2a_group, self.ring_group, self.kv_replicas = None, None, 1
        if config.context_parallel_size > 1:
            layout = _context_parallel_layout(config, cp_comm_type)
            self.kv_replicas = layout.kv_replication(config.num_query_groups)
            self.a2a_group, self.ring_group = _cp_groups(pg_collection, config, layout.a2a_size)

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
        # The mask's RNG stream is DotProductAttention's: the tracker's, or the default one under SP.
        if self.config.sequence_parallel:
            rng = contextlib.nullcontext()
        else:
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        with rng:
            return self._attend(query, key, value, causal, dropout_p)

    def _attend(self, query, key, value, causal: bool, dropout_p: float) -> torch.Tensor:
        """``[s, b, heads, hn]`` tensors (this rank's sequence shard under CP) -> ``[s, b, heads * hn]``."""
        if self.a2a_group is not None:
            if self.kv_replicas > 1:  # fewer K/V groups than a2a ranks: one (replicated) group per rank
                key, value = (t.repeat_interleave(self.kv_replicas, dim=2) for t in (key, value))
            query, key, value = (sequence_to_heads(t, self.a2a_group) for t in (query, key, value))
        if self.ring_group is not None:
            if dropout_p > 0.0:
                raise ValueError(
                    f"attention_dropout={dropout_p} with cp_comm_type 'p2p' or 'a2a+p2p': the ring "
                    "attention has no dropout; use attention_dropout=0 or cp_comm_type='a2a'"
                )
            context = ring_attention(query, key, value, self.ring_group, causal, self.softmax_scale)
        else:
            context = _sdpa(query, key, value, causal, dropout_p, self.softmax_scale)
        if self.a2a_group is not None:
            context = heads_to_sequence(context, self.a2a_group)
        return context.reshape(context.size(0), context.size(1), -1)


def _sdpa(query, key, value, causal: bool, dropout_p: float, softmax_scale) -> torch.Tensor:
    """SDPA on ``[s, b, heads, hn]`` tensors (``query.size(2) / key.size(2)`` queries per key group);
    returns the context as ``[s, b, heads, hn]``."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.size(-1))
    gqa = q.size(1) != k.size(1)
    if gqa and _sdpa_backend(q, k, v, dropout_p, causal, scale) == SDPBackend.MATH.value:
        # A fused kernel without native GQA: expanded K/V (linear in s) beat the quadratic math kernel.
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
        gqa = False
    context = F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=gqa
    )
    return context.permute(2, 0, 1, 3)  # [b, np, sq, hn] -> [sq, b, np, hn]


def _sdpa_backend(q, k, v, dropout_p: float, causal: bool, scale: float) -> int:
    """The kernel SDPA would pick for grouped-query inputs (``SDPBackend`` value; torch's dispatcher
    query, private but stable since torch 2.0)."""
    return torch._fused_sdp_choice(q, k, v, None, dropout_p, causal, scale=scale, enable_gqa=True)


def _cp_groups(pg_collection: Optional[ProcessGroupCollection], config: TransformerConfig, a2a_size: int):
    """``(all-to-all group or None, ring group or None)`` from the collection's (else megatron's
    global) CP groups; their sizes must be the config's."""
    cp = config.context_parallel_size
    group = getattr(pg_collection, "cp", None) or parallel_state.get_context_parallel_group()
    if group.size() != cp:
        raise ValueError(
            f"context_parallel_size={cp} in the config, but the context-parallel process group has "
            f"{group.size()} ranks; initialise the parallel state with the same context_parallel_size"
        )
    if a2a_size == cp:
        return group, None
    if a2a_size == 1:
        return None, group
    sizes = list(config.hierarchical_context_parallel_sizes)
    levels = getattr(pg_collection, "hcp", None) or parallel_state.get_hierarchical_context_parallel_groups(
        check_initialized=False
    )
    if not levels or [g.size() for g in levels] != sizes:
        raise ValueError(
            f"hierarchical_context_parallel_sizes={sizes} in the config, but the hierarchical "
            f"context-parallel process groups have sizes {[g.size() for g in levels or []]}; initialise "
            "the parallel state with the same hierarchical_context_parallel_sizes"
        )
    return levels[0], levels[1]


def _context_parallel_layout(config: TransformerConfig, cp_comm_type) -> ParallelLayout:
    """The config's context parallelism as a checked layout (None: megatron's default, the all-to-all)."""
    comm = "a2a" if cp_comm_type is None else cp_comm_type
    sizes = config.hierarchical_context_parallel_sizes if comm == "a2a+p2p" else None
    layout = ParallelLayout(tp=config.tensor_model_parallel_size, cp=config.context_parallel_size,
                            cp_comm_type=comm, hierarchical_cp_sizes=None if sizes is None else tuple(sizes))
    layout.check_heads(config.num_attention_heads, config.num_query_groups)
    return layout


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


class ConfigSelfAttention(SelfAttention):
    """megatron-core's ``SelfAttention`` whose query/key norms follow ``config.qk_layernorm``.

    A layer spec is built before the config is known; this fills the ``q_layernorm``/``k_layernorm``
    slots when the layer is built: :class:`~mst_megatron.modules.norm.ConfigNorm` (of
    ``normalization``, default the config's) when ``config.qk_layernorm``, else identity. An
    explicit ``qk_layernorm`` that differs from the config's is a ``ValueError``, never silently
    identity norms. Parameters and state-dict keys are ``SelfAttention``'s.
    """

    def __init__(self, config: TransformerConfig, submodules, *args, qk_layernorm: Optional[bool] = None,
                 normalization: Optional[str] = None, **kwargs):
        from mst_megatron.modules.norm import ConfigNorm

        if qk_layernorm is not None and qk_layernorm != config.qk_layernorm:
            raise ValueError(
                f"config.qk_layernorm is {config.qk_layernorm} but this layer spec was built with "
                f"qk_layernorm={qk_layernorm}: build the spec with the config's value (or leave it None)"
            )
        norm = IdentityOp
        if config.qk_layernorm:
            norm = ModuleSpec(module=ConfigNorm, params={"normalization": normalization})
        submodules = dataclasses.replace(submodules, q_layernorm=norm, k_layernorm=norm)
        super().__init__(config, submodules, *args, **kwargs)
