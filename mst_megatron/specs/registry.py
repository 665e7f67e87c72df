"""MST specs by name, and model builders in the call shapes Megatron-LM and Megatron-Bridge use.

* Megatron-LM: ``--spec mst_megatron.specs.registry mst_layer_spec`` (mini-sequence MLP only), or
  :func:`mst_gpt_builder` / :func:`model_provider` for the whole MST model; :func:`add_mst_arguments`
  as ``extra_args_provider`` adds ``--mlp-mini-sequences`` / ``--lm-head-mini-sequences``.
* Megatron-Bridge: :func:`mst_block_spec` as ``GPTConfig.transformer_layer_spec``, and
  ``provider.register_pre_wrap_hook(mst_pre_wrap_hook)`` to promote the models to ``MSTGPTModel``.

Chunk counts default to ``"auto"``; the callables take them as keyword arguments.
"""

from typing import List, Optional

from megatron.core.models.gpt import GPTModel

from mst_megatron.modules.gpt_model import MSTGPTModel
from mst_megatron.ops.chunking import AUTO, ChunkCount
from mst_megatron.specs.gpt_layer_specs import get_gpt_mst_block_spec, get_gpt_mst_layer_spec

__all__ = ["SPECS", "get_spec", "add_mst_arguments", "mst_layer_spec", "mst_layer_spec_layernorm", "mst_layer_spec_qk_norm",
           "mst_block_spec", "mst_gpt_builder", "model_provider", "mst_pre_wrap_hook"]

# Layer specs (``ModuleSpec``): for Megatron-LM's --spec and for GPTConfig.transformer_layer_spec.
mst_layer_spec = get_gpt_mst_layer_spec()  # norms and qk-norm as the model's config says
mst_layer_spec_layernorm = get_gpt_mst_layer_spec(normalization="LayerNorm")
mst_layer_spec_qk_norm = get_gpt_mst_layer_spec(qk_layernorm=True)  # needs config.qk_layernorm (--qk-layernorm)


def mst_block_spec(config, vp_stage: Optional[int] = None, mlp_mini_sequences: ChunkCount = AUTO):
    """``GPTConfig.transformer_layer_spec`` callable: this pipeline stage's MST block spec, with the
    config's normalization and QK norm and an SP-aware final norm."""
    return get_gpt_mst_block_spec(config, mlp_mini_sequences, vp_stage=vp_stage)


SPECS = {
    "mst_layer_spec": mst_layer_spec,
    "mst_layer_spec_layernorm": mst_layer_spec_layernorm,
    "mst_layer_spec_qk_norm": mst_layer_spec_qk_norm,
    "mst_block_spec": mst_block_spec,
}


def get_spec(name: str):
    """The named spec (a ``ModuleSpec``, or the :func:`mst_block_spec` callable)."""
    if name not in SPECS:
        raise ValueError(f"unknown MST spec name {name!r}; known names: {sorted(SPECS)}")
    return SPECS[name]


def add_mst_arguments(parser):
    """Megatron-LM ``extra_args_provider`` (``parse_args(extra_args_provider=...)``): the MST chunk
    counts as flags, an int >= 1 or ``auto``. Returns the parser."""
    from mst_megatron.training.arguments import add_mst_flags

    add_mst_flags(parser)
    return parser


def mst_gpt_builder(args, pre_process: bool, post_process: bool, vp_stage: Optional[int] = None, config=None,
                    pg_collection=None) -> MSTGPTModel:
    """Megatron-LM's ``gpt_builder`` call shape (``model_provider`` calls it with Megatron-LM's
    ``args``): an ``MSTGPTModel`` with the MST block spec, from the same arguments the stock builder
    reads. ``config`` defaults to Megatron-LM's ``core_transformer_config_from_args(args)``."""
    if getattr(args, "use_legacy_models", False):
        raise ValueError("mst_gpt_builder builds megatron-core models: drop --use-legacy-models")
    if getattr(args, "spec", None) is not None:
        raise ValueError(f"mst_gpt_builder builds the MST block spec itself: drop --spec {' '.join(args.spec)}")
    if getattr(args, "mtp_num_layers", None):
        raise ValueError("mst_gpt_builder does not build multi-token prediction layers: drop --mtp-num-layers")
    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args  # Megatron-LM itself

        config = core_transformer_config_from_args(args)
    spec = mst_block_spec(config, vp_stage, getattr(args, "mlp_mini_sequences", AUTO))
    return MSTGPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
        lm_head_mini_sequences=getattr(args, "lm_head_mini_sequences", AUTO),
        offload_layer_inputs=getattr(args, "offload_layer_inputs", False),
    )


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config=None, pg_collection=None) -> MSTGPTModel:
    """Megatron-LM's ``model_provider`` call shape (``pretrain`` calls it per model chunk):
    :func:`mst_gpt_builder` with Megatron-LM's global ``args``."""
    from megatron.training import get_args  # Megatron-LM itself

    return mst_gpt_builder(get_args(), pre_process, post_process, vp_stage, config=config,
                           pg_collection=pg_collection)


def mst_pre_wrap_hook(model: List[GPTModel], lm_head_mini_sequences: ChunkCount = AUTO) -> List[MSTGPTModel]:
    """Megatron-Bridge pre-wrap hook (list of model chunks in, list out): promote each stock
    ``GPTModel`` to ``MSTGPTModel`` in place, before DDP wraps it."""
    return [MSTGPTModel.adopt(chunk, lm_head_mini_sequences) for chunk in model]
