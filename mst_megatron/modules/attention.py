"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``, for the MST layer spec.

A drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward signature, no
parameters, so state dicts are unchanged) that never builds the ``[b, heads, s, s]`` score tensor:
SDPA dispatches to flash-style kernels on CPU and GPU that keep only the output and the per-row
log-sum-exp. Long mini-sequence runs need this; the stock local attention's scores grow as ``s^2``
and dominate memory long before the MLP does.

Supported: causal and unmasked self-attention; grouped-query attention (SDPA's ``enable_gqa``, K/V not
expanded, wherever the kernel SDPA picks supports it; otherwise K/V are expanded to the query heads,
which costs memory linear in s rather than a fall-back to the quadratic math kernel); attention
dropout drawn from the RNG stream ``DotProductAttention`` draws it from; context parallelism (below).
Refused with a clear error: other mask types, packed sequences, attention bias, sliding windows and
non-vanilla softmax.

Context parallelism (``context_parallel_size = cp > 1``, megatron's ``cp_comm_type`` ``"a2a"``, the
default here): each rank holds a load-balanced shard of the sequence (megatron's
``get_batch_on_this_cp_rank`` layout). :mod:`mst_megatron.ops.context_parallel` all-to-alls the
queries, keys and values to the whole sequence for ``1/cp`` of this TP rank's heads, in natural
order, SDPA runs on that (causal = the plain lower triangle), and the context goes back to the
sequence shard. This needs the heads per TP rank divisible by ``cp``; the key/value groups per TP
rank either divisible by ``cp`` too, or dividing it, in which case each group is replicated
``cp / groups`` times before the exchange (its gradients sum back through the replication). Other
combinations are refused naming the sizes (a ring-attention path would lift this; not implemented).

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

from mst_megatron.ops.context_parallel import heads_to_sequence, sequence_to_heads

__all__ = ["SDPAttention", "ConfigSelfAttention"]

SUPPORTED_MASK_TYPES = (AttnMaskType.causal, AttnMaskType.no_mask)
CP_COMM_TYPES = (None, "a2a")  # None: megatron's default, taken as the all-to-all here
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
        # None: 1/sqrt(head dim), resolved from the query in forward. megatron's
        # apply_query_key_layer_scaling divides the scale by layer_number and multiplies the scores
        # back before the softmax: the same math, so it needs no counterpart here.
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # Context parallelism: the group to exchange over and how often to replicate each K/V group.
        self.cp_group, self.kv_replicas = None, 1
        if config.context_parallel_size > 1:
            self.kv_replicas = _check_context_parallel(config, cp_comm_type)
            self.cp_group = _cp_group(pg_collection, config.context_parallel_size)

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
        """``[s, b, heads, hn]`` tensors (this rank's sequence shard under CP) -> ``[s, b, heads * hn]``."""
        if self.cp_group is None:
            context = _sdpa(query, key, value, causal, dropout_p, self.softmax_scale)
        else:
            if self.kv_replicas > 1:  # fewer K/V groups than CP ranks: one (replicated) group per rank
                key, value = (t.repeat_interleave(self.kv_replicas, dim=2) for t in (key, value))
            q, k, v = (sequence_to_heads(t, self.cp_group) for t in (query, key, value))
            context = heads_to_sequence(_sdpa(q, k, v, causal, dropout_p, self.softmax_scale), self.cp_group)
        return context.reshape(context.size(0), context.size(1), -1)


def _sdpa(query, key, value, causal: bool, dropout_p: float, softmax_scale) -> torch.Tensor:
    """SDPA on ``[s, b, heads, hn]`` tensors (``query.size(2) / key.size(2)`` queries per key group);
    returns the context as ``[s, b, heads, hn]``."""
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.size(-1))
    gqa = q.size(1) != k.size(1)
    if gqa and _sdpa_backend(q, k, v, dropout_p, causal, scale) == SDPBackend.MATH.value:
        # Some fused kernels (e.g. older CUDA memory-efficient ones) lack native GQA: expanding
        # K/V (query-sized, linear in s) keeps them eligible instead of the quadratic math kernel.
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


def _cp_group(pg_collection: Optional[ProcessGroupCollection], cp: int):
    """The context-parallel group: the collection's, else megatron's global one; its size must be ``cp``."""
    group = getattr(pg_collection, "cp", None) or parallel_state.get_context_parallel_group()
    if group.size() != cp:
        raise ValueError(
            f"context_parallel_size={cp} in the config, but the context-parallel process group has "
            f"{group.size()} ranks; initialise the parallel state with the same context_parallel_size"
        )
    return group


def _check_context_parallel(config: TransformerConfig, cp_comm_type) -> int:
    """Refuse what the all-to-all cannot do, naming the sizes; return the K/V replication factor."""
    if cp_comm_type not in CP_COMM_TYPES:
        raise ValueError(
            f"cp_comm_type={cp_comm_type!r} is not supported by SDPAttention (it implements the "
            f"all-to-all exchange); allowed: {CP_COMM_TYPES}"
        )
    cp, tp = config.context_parallel_size, config.tensor_model_parallel_size
    heads, groups = config.num_attention_heads // tp, config.num_query_groups // tp
    if heads % cp:
        raise ValueError(
            f"context parallelism in SDPAttention trades sequence shards for head shards: the "
            f"attention heads per tensor-parallel rank (num_attention_heads {config.num_attention_heads} / "
            f"tensor_model_parallel_size {tp} = {heads}) must be divisible by context_parallel_size {cp}"
        )
    if groups % cp and cp % groups:
        raise ValueError(
            f"context parallelism in SDPAttention: the key/value groups per tensor-parallel rank "
            f"(num_query_groups {config.num_query_groups} / tensor_model_parallel_size {tp} = {groups}) "
            f"must be divisible by context_parallel_size {cp}, or divide it (then they are replicated)"
        )
    return max(1, cp // groups)


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
