"""torch's RMSNorm and LayerNorm built like megatron norms, with weights marked for SP's TP gradient
all-reduce; math and state-dict keys of the stock local spec (docs/design.md#norms)."""

from typing import Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["RMSNorm", "LayerNorm", "NORMS", "ConfigNorm"]


def _check_config(config: TransformerConfig, normalization: str) -> None:
    if config.normalization != normalization:
        raise ValueError(
            f"config.normalization is {config.normalization!r} but this layer spec was built with "
            f"normalization={normalization!r}: build the spec with the config's normalization"
        )
    if config.layernorm_zero_centered_gamma:
        raise ValueError(
            "layernorm_zero_centered_gamma=True is not supported by the MST local norms "
            "(torch's norms have no zero-centred weight); set it to False"
        )


def _mark_sequence_parallel(norm: torch.nn.Module, config: TransformerConfig) -> None:
    """Tell ``finalize_model_grads`` to all-reduce these gradients over TP when SP is on."""
    for param in norm.parameters():
        setattr(param, "sequence_parallel", config.sequence_parallel)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built like a megatron norm (``config, hidden_size, eps``), SP-aware."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        _check_config(config, "RMSNorm")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        _mark_sequence_parallel(self, config)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` built like a megatron norm (``config, hidden_size, eps``), SP-aware."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        _check_config(config, "LayerNorm")
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        _mark_sequence_parallel(self, config)


# ``normalization`` value (megatron's names) -> norm class
NORMS = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}


class ConfigNorm:
    """Builds the norm ``config.normalization`` names (as the stock local spec's norm does), or the
    one ``normalization`` names, which must then equal the config's."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                normalization: Optional[str] = None):
        name = config.normalization if normalization is None else normalization
        if name not in NORMS:
            raise ValueError(f"normalization must be one of {tuple(NORMS)}, got {name!r}")
        return NORMS[name](config, hidden_size, eps)

