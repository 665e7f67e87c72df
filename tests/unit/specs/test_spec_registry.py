"""Named MST specs and model builders, called the way Megatron-LM and NeMo / Megatron-Bridge call
them (neither is installed here: their call shapes are emulated, megatron-core's own
``import_module`` is the real one)."""

import argparse
import functools
import inspect
import sys
import types

import pytest
import torch

VOCAB, SEQ = 256, 32


def _bridge_resolve(spec, config, vp_stage=None):
    """What a Bridge/NeMo GPT provider does with ``transformer_layer_spec`` before building GPTModel."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, ModuleSpec):
        return spec
    if "vp_stage" in inspect.signature(spec).parameters:
        return spec(config, vp_stage=vp_stage)
    return spec(config)


def _megatron_lm_args(**changes):
    """The fields of Megatron-LM's ``args`` that its ``gpt_builder`` (and ours) reads."""
    values = dict(use_legacy_models=False, spec=None, mtp_num_layers=None, padded_vocab_size=VOCAB,
                  max_position_embeddings=SEQ, fp16_lm_cross_entropy=False, untie_embeddings_and_output_weights=True,
                  position_embedding_type="rope", rotary_percent=1.0, rotary_base=10000, use_rope_scaling=False)
    return argparse.Namespace(**{**values, **changes})


def _loss(model, seed=0):
    torch.manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    labels = torch.randint(0, VOCAB, (2, SEQ))
    positions = torch.arange(SEQ).expand(2, SEQ)
    return model(tokens, positions, None, labels=labels)


def test_megatron_lm_spec_flag_resolves_layer_specs(one_rank):
    """``--spec mst_megatron.specs.registry <name>``: megatron-core's import_module, used as is."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    from mst_megatron.modules.mlp import MiniSequenceMLP
    from tests.helpers.models import tiny_config

    for name in ("mst_layer_spec", "mst_layer_spec_layernorm", "mst_layer_spec_qk_norm"):
        spec = import_module(("mst_megatron.specs.registry", name))
        assert isinstance(spec, ModuleSpec) and spec.submodules.mlp.module is MiniSequenceMLP, name
    spec = import_module(("mst_megatron.specs.registry", "mst_layer_spec"))
    model = GPTModel(tiny_config(), spec, VOCAB, SEQ, position_embedding_type="rope")
    assert isinstance(model.decoder.layers[0].mlp, MiniSequenceMLP)
    assert _loss(model).shape == (2, SEQ)


def test_get_spec_names_and_unknown_name():
    from mst_megatron.specs import registry

    assert registry.get_spec("mst_block_spec") is registry.mst_block_spec
    with pytest.raises(ValueError, match=r"unknown MST spec name 'mst_mlp'; known names: \['mst_block_spec', "):
        registry.get_spec("mst_mlp")


def test_bridge_transformer_layer_spec_and_pre_wrap_hook(one_rank):
    """GPTConfig.transformer_layer_spec as a callable (with vp_stage) or a ModuleSpec; the pre-wrap
    hook turns the provider's GPTModel into MSTGPTModel with the same loss."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from mst_megatron import MSTGPTModel
    from mst_megatron.modules.lm_head import MiniSequenceLMHead
    from mst_megatron.modules.norm import RMSNorm
    from mst_megatron.specs import registry
    from tests.helpers.models import tiny_config

    config = tiny_config()
    assert _bridge_resolve(registry.mst_layer_spec, config) is registry.mst_layer_spec
    spec = _bridge_resolve(functools.partial(registry.mst_block_spec, mlp_mini_sequences=3), config, vp_stage=None)
    assert isinstance(spec, TransformerBlockSubmodules) and spec.layer_norm is RMSNorm
    assert len(spec.layer_specs) == config.num_layers
    assert spec.layer_specs[0].submodules.mlp.params == {"mlp_mini_sequences": 3}

    torch.manual_seed(0)
    model = GPTModel(config, spec, VOCAB, SEQ, position_embedding_type="rope")
    stock = _loss(model)
    (promoted,) = registry.mst_pre_wrap_hook([model])
    assert promoted is model and type(model) is MSTGPTModel and type(model.output_layer) is MiniSequenceLMHead
    torch.testing.assert_close(_loss(model), stock, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="model must be a megatron-core GPTModel .*got MSTGPTModel"):
        registry.mst_pre_wrap_hook([model])


def test_megatron_lm_builder_and_model_provider(one_rank, monkeypatch):
    """pretrain_gpt.py's ``model_provider(model_builder, pre_process, post_process, vp_stage, config=,
    pg_collection=)`` calling our builder; and a plain ``model_provider`` reading ``get_args()``."""
    from mst_megatron import MSTGPTModel
    from mst_megatron.modules.lm_head import MiniSequenceLMHead
    from mst_megatron.modules.mlp import MiniSequenceMLP
    from mst_megatron.modules.norm import RMSNorm
    from mst_megatron.specs import registry
    from tests.helpers.models import tiny_config

    config = tiny_config()
    args = _megatron_lm_args(lm_head_mini_sequences=5, mlp_mini_sequences=2)
    model = registry.mst_gpt_builder(args, True, True, None, config=config, pg_collection=None)
    assert type(model) is MSTGPTModel and model.output_layer.mini_sequences == 5
    assert isinstance(model.output_layer, MiniSequenceLMHead) and isinstance(model.decoder.final_layernorm, RMSNorm)
    mlp = model.decoder.layers[0].mlp
    assert isinstance(mlp, MiniSequenceMLP) and mlp.mlp_mini_sequences == 2
    assert _loss(model).shape == (2, SEQ)

    training = types.ModuleType("megatron.training")
    training.get_args = lambda: _megatron_lm_args()
    monkeypatch.setitem(sys.modules, "megatron.training", training)
    model = registry.model_provider(pre_process=True, post_process=False, vp_stage=None, config=config)
    assert type(model) is MSTGPTModel and not model.post_process and not hasattr(model, "output_layer")

    for change, message in [(dict(spec=["my.specs", "layer"]), "drop --spec my.specs layer"),
                            (dict(use_legacy_models=True), "drop --use-legacy-models"),
                            (dict(mtp_num_layers=1), "drop --mtp-num-layers")]:
        with pytest.raises(ValueError, match=message):
            registry.mst_gpt_builder(_megatron_lm_args(**change), True, True, config=config)
