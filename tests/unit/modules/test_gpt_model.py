"""MSTGPTModel's construction-time checks (no ranks: megatron's default, unset parallel state)."""

import pytest
import torch

VOCAB, S = 256, 29


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True, None])
def test_bad_mini_sequence_count_refused_at_construction(bad):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mst_megatron import MSTGPTModel

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    with pytest.raises(ValueError, match="lm_head_mini_sequences must be an int >= 1 or 'auto'"):
        MSTGPTModel(config, get_gpt_layer_local_spec(), VOCAB, S, lm_head_mini_sequences=bad)


def test_deferred_embedding_wgrad_refused_at_construction():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mst_megatron import MSTGPTModel

    # megatron allows the deferral only with PP and gradient-accumulation fusion
    config = TransformerConfig(
        num_layers=2, hidden_size=8, num_attention_heads=1, pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32, gradient_accumulation_fusion=True, defer_embedding_wgrad_compute=True,
    )
    with pytest.raises(ValueError, match="defer_embedding_wgrad_compute=False"):
        MSTGPTModel(config, get_gpt_layer_local_spec(), VOCAB, S)
