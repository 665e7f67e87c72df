"""The Llama-family ``TransformerConfig`` every MST model here starts from: RMSNorm, SwiGLU, no
linear biases, and megatron's fused kernels off (they need Apex or Transformer Engine)."""

import torch
import torch.nn.functional as F

__all__ = ["llama_transformer_config"]


def llama_transformer_config(**fields):
    """``TransformerConfig(**fields)`` over the Llama-family defaults; ``pipeline_dtype`` follows
    ``params_dtype`` unless given."""
    from megatron.core.transformer.transformer_config import TransformerConfig

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
    return TransformerConfig(**kwargs)
