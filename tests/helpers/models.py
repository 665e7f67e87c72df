"""Tiny Llama-shaped megatron-core models shared by the tests."""

import torch


def tiny_config(**overrides):
    """RMSNorm, SwiGLU, RoPE, grouped-query attention, fp32: a 2-layer Llama in miniature."""
    from megatron.core import parallel_state as ps

    from mst_megatron.specs.llama_config import llama_transformer_config

    kwargs = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=160,
        num_attention_heads=4,
        num_query_groups=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
    )
    kwargs.update(overrides)
    return llama_transformer_config(**kwargs)


def _gpt(model_cls, config, layer_spec, vocab_size, seq_length, tied, vp_stage, **extra):
    """A GPT of ``model_cls`` for this pipeline stage, with the shared tiny-test settings."""
    from megatron.core import parallel_state as ps

    return model_cls(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope",
        vp_stage=vp_stage,
        **extra,
    )


def _local_spec(config, qk_layernorm=False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization=config.normalization, qk_layernorm=qk_layernorm)


def stock_gpt(config, vocab_size=256, seq_length=32, tied=False, vp_stage=None, qk_layernorm=False):
    """Stock megatron-core ``GPTModel`` with the local spec: the reference for every MST test."""
    from megatron.core.models.gpt import GPTModel

    spec = _local_spec(config, qk_layernorm)
    return _gpt(GPTModel, config, spec, vocab_size, seq_length, tied, vp_stage)


def mst_gpt(config, mlp_mini_sequences="auto", vocab_size=256, seq_length=32, tied=False, vp_stage=None):
    """``stock_gpt``'s model with the MST block spec (mini-sequence MLP, SP-aware norms, SDPA)."""
    from megatron.core.models.gpt import GPTModel
    from mst_megatron.specs.gpt_layer_specs import get_gpt_mst_block_spec

    spec = get_gpt_mst_block_spec(config, mlp_mini_sequences, vp_stage=vp_stage)
    return _gpt(GPTModel, config, spec, vocab_size, seq_length, tied, vp_stage)


def mst_head_gpt(config, lm_head_mini_sequences="auto", vocab_size=256, seq_length=32, tied=False, vp_stage=None):
    """``stock_gpt``'s model (stock local spec) as an ``MSTGPTModel``: only the LM head differs."""
    from mst_megatron import MSTGPTModel

    return _gpt(
        MSTGPTModel, config, _local_spec(config), vocab_size, seq_length, tied, vp_stage,
        lm_head_mini_sequences=lm_head_mini_sequences,
    )


def mst_full_gpt(config, mlp_mini_sequences="auto", lm_head_mini_sequences="auto", vocab_size=256, seq_length=32,
                 tied=False, vp_stage=None):
    """Everything MST: the MST block spec in an ``MSTGPTModel`` (what the pretraining job builds)."""
    from mst_megatron import MSTGPTModel
    from mst_megatron.specs.gpt_layer_specs import get_gpt_mst_block_spec

    spec = get_gpt_mst_block_spec(config, mlp_mini_sequences, vp_stage=vp_stage)
    return _gpt(
        MSTGPTModel, config, spec, vocab_size, seq_length, tied, vp_stage,
        lm_head_mini_sequences=lm_head_mini_sequences,
    )
