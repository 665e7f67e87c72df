"""The Llama-family ``TransformerConfig`` every MST model here starts from: RMSNorm, SwiGLU, no
linear biases, and megatron's fused kernels off (they need Apex or Transformer Engine)."""

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["YarnTransformerConfig", "llama_transformer_config"]


@dataclasses.dataclass
class YarnTransformerConfig(TransformerConfig):
    """``TransformerConfig`` with the ``yarn_*`` attributes that megatron-core's ``GPTModel``
    (``position_embedding_type="yarn"``) and attention read from the config; their meaning and
    defaults are ``YarnRotaryEmbedding``'s. ``yarn_mscale``/``yarn_mscale_all_dim`` None: the
    attention factor (cos/sin scale) is ``0.1 ln(factor) + 1``, else the ratio of the two mscales."""

    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: Optional[float] = None
    yarn_mscale_all_dim: Optional[float] = None
    yarn_correction_range_round_to_int: bool = True


def llama_transformer_config(**fields) -> TransformerConfig:
    """``TransformerConfig(**fields)`` over the Llama-family defaults (a
    :class:`YarnTransformerConfig` when a ``yarn_*`` field is given); ``pipeline_dtype`` follows
    ``params_dtype`` unless given."""
    kwargs = dict(
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cuda_graph_scope=[],  # no CUDA graphs; megatron's default ("full") warns as deprecated
    )
    kwargs.update(fields)
    kwargs.setdefault("pipeline_dtype", kwargs.get("params_dtype", torch.float32))
    config_cls = YarnTransformerConfig if any(k.startswith("yarn_") for k in fields) else TransformerConfig
    return config_cls(**kwargs)
