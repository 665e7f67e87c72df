"""GPT layer and block specs with mini-sequence MLPs, built from megatron-core's local modules.

:func:`get_gpt_mst_layer_spec` is a drop-in for ``get_gpt_layer_local_spec()`` with the same
parameter names (a stock ``state_dict`` loads with ``strict=True``) and four modules swapped: the
MLP (:class:`~mst_megatron.modules.mlp.MiniSequenceMLP`), the QKV projection
(:class:`~mst_megatron.modules.linear.MiniSequenceColumnParallelLinear`), the norms
(:mod:`mst_megatron.modules.norm`) and the core attention
(:class:`~mst_megatron.modules.attention.SDPAttention`). Under ``sequence_parallel=True`` pass
:func:`get_gpt_mst_block_spec` (it adds the SP-aware final norm). See docs/design.md#model-and-specs.
"""

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from mst_megatron.modules.attention import ConfigSelfAttention, SDPAttention
from mst_megatron.modules.gpt_model import block_spec_from_layer_spec
from mst_megatron.modules.linear import MiniSequenceColumnParallelLinear
from mst_megatron.modules.mlp import MiniSequenceMLP
from mst_megatron.modules.norm import NORMS, ConfigNorm
from mst_megatron.ops.chunking import AUTO, ChunkCount, validate_chunk_count

__all__ = ["get_gpt_mst_layer_spec", "get_gpt_mst_block_spec", "get_mlp_spec"]

BACKENDS = ("local",)


def get_gpt_mst_layer_spec(
    mlp_mini_sequences: ChunkCount = AUTO,
    normalization: Optional[str] = None,
    qk_layernorm: Optional[bool] = None,
    backend: str = "local",
) -> ModuleSpec:
    """``TransformerLayer`` spec: local linears (QKV chunked under SP), SP-aware norms, SDPA core
    attention, chunked MLP.

    Args:
        mlp_mini_sequences: chunks per MLP call, an int >= 1 or ``"auto"`` (see
            :class:`~mst_megatron.modules.mlp.MiniSequenceMLP`); 1 is the stock MLP computation.
        normalization: ``"RMSNorm"`` or ``"LayerNorm"``; None (default): ``config.normalization``.
        qk_layernorm: per-head query/key norms; None (default): ``config.qk_layernorm``.
        backend: ``"local"`` only (megatron-core's own linears).
    Raises ``ValueError`` for a bad name or count here, and when the layer is built with a
    ``normalization`` or ``qk_layernorm`` that differs from the config's.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    mlp_mini_sequences = validate_chunk_count(mlp_mini_sequences, "mlp_mini_sequences")
    if normalization is not None:
        _norm(normalization)  # a bad name fails here, not at build time
    norm = ModuleSpec(module=ConfigNorm, params={"normalization": normalization})
    linears = LocalSpecProvider()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=ConfigSelfAttention,  # fills the q/k norm slots from config.qk_layernorm
                params={"attn_mask_type": AttnMaskType.causal, "qk_layernorm": qk_layernorm,
                        "normalization": normalization},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=MiniSequenceColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=linears.row_parallel_linear(),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MiniSequenceMLP,
                # TransformerLayer gives an MLP subclass only `config`: the rest travels here.
                params={"mlp_mini_sequences": mlp_mini_sequences},
                submodules=_mlp_submodules(linears),
            ),
            mlp_bda=get_bias_dropout_add,
            # Same sharded-checkpoint keys as the local spec (which maps to TE's fused names).
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def get_gpt_mst_block_spec(
    config: TransformerConfig,
    mlp_mini_sequences: ChunkCount = AUTO,
    normalization: Optional[str] = None,
    qk_layernorm: Optional[bool] = None,
    backend: str = "local",
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """``TransformerBlock`` spec: this stage's MST layers plus an SP-aware final norm.

    ``normalization`` and ``qk_layernorm`` default to the config's. ``vp_stage``/``pp_rank`` select the
    pipeline stage as in megatron's ``get_gpt_decoder_block_spec``.
    """
    normalization = config.normalization if normalization is None else normalization
    qk_layernorm = config.qk_layernorm if qk_layernorm is None else qk_layernorm
    layer = get_gpt_mst_layer_spec(mlp_mini_sequences, normalization, qk_layernorm, backend)
    return block_spec_from_layer_spec(config, layer, _norm(normalization), vp_stage=vp_stage, pp_rank=pp_rank)


def get_mlp_spec(config: TransformerConfig, mlp_mini_sequences: Optional[ChunkCount] = AUTO) -> ModuleSpec:
    """A standalone MLP spec (to ``build_module`` outside a layer): ``MiniSequenceMLP``, or megatron's
    own ``MLP`` with the same linears when ``mlp_mini_sequences`` is None (the reference MST is
    measured and tested against)."""
    submodules = _mlp_submodules(LocalSpecProvider())
    if mlp_mini_sequences is None:
        return ModuleSpec(MLP, submodules=submodules, params={"ffn_hidden_size": config.ffn_hidden_size})
    return ModuleSpec(MiniSequenceMLP, submodules=submodules,
                      params={"mlp_mini_sequences": validate_chunk_count(mlp_mini_sequences, "mlp_mini_sequences")})


def _mlp_submodules(linears: LocalSpecProvider) -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=linears.column_parallel_linear(), linear_fc2=linears.row_parallel_linear())


def _norm(normalization: str) -> type:
    if normalization not in NORMS:
        raise ValueError(f"normalization must be one of {tuple(NORMS)}, got {normalization!r}")
    return NORMS[normalization]
