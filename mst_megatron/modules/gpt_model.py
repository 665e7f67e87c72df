"""``MSTGPTModel``: megatron-core's ``GPTModel`` whose training loss never materialises the logits
(docs/design.md#model-and-specs)."""

from typing import Optional

from megatron.core.config_logger import has_config_logger_enabled
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from mst_megatron.modules.lm_head import MiniSequenceLMHead, check_head_options
from mst_megatron.modules.norm import NORMS
from mst_megatron.ops.chunking import AUTO, ChunkCount
from mst_megatron.ops.offload import HostOffload

__all__ = ["MSTGPTModel", "block_spec_from_layer_spec"]


def block_spec_from_layer_spec(config: TransformerConfig, layer_spec: ModuleSpec, final_norm: Optional[type] = None,
                               vp_stage: Optional[int] = None, pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers of ``layer_spec`` with ``final_norm`` (default: the SP-aware norm of
    ``config.normalization``; megatron's own refuses SP)."""
    final_norm = NORMS[config.normalization] if final_norm is None else final_norm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=final_norm)


class MSTGPTModel(GPTModel):
    """``GPTModel`` with a mini-sequence LM head; extra args ``lm_head_mini_sequences`` (int >= 1 or
    ``"auto"``, :func:`~mst_megatron.layout.head_chunk_count`) and ``offload_layer_inputs`` (bool,
    needs ``recompute_granularity="full"``: the inputs the decoder's checkpoints save, and the final
    norm's, wait in host memory for backward, :class:`~mst_megatron.ops.offload.HostOffload`, kept as
    ``self.layer_input_offload``). Under SP a layer spec gets the SP-aware final norm. ``forward`` keeps the stock contract: with ``labels [b, s]`` the
    fp32 per-token loss ``[b, s]`` from the vocab-parallel logits (``parallel_output`` does not apply)."""

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec,
        vocab_size: int,
        max_sequence_length: int,
        *args,
        lm_head_mini_sequences: ChunkCount = AUTO,
        offload_layer_inputs: bool = False,
        **kwargs,
    ) -> None:
        lm_head_mini_sequences = check_head_options(config, lm_head_mini_sequences)  # on every stage, first
        check_offload_options(config, offload_layer_inputs)
        if config.sequence_parallel and isinstance(transformer_layer_spec, ModuleSpec):
            transformer_layer_spec = block_spec_from_layer_spec(config, transformer_layer_spec,
                                                                vp_stage=kwargs.get("vp_stage"))
        super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length, *args, **kwargs)
        if self.post_process:
            MiniSequenceLMHead.adopt(self.output_layer, lm_head_mini_sequences)
        self._offload_layer_inputs(offload_layer_inputs)

    def _offload_layer_inputs(self, on: bool) -> None:
        self.layer_input_offload = HostOffload() if on else None
        if not on:
            return
        config, layers = self.config, len(self.decoder.layers)
        if config.recompute_method == "block" and config.recompute_num_layers < layers:
            raise ValueError(
                f"offload_layer_inputs=True with recompute_method='block' needs every layer of the chunk "
                f"checkpointed (recompute_num_layers >= {layers}, got {config.recompute_num_layers}): the "
                "activations of the layers left out would go to host memory too"
            )
        _offload_inside(self.decoder, self.layer_input_offload)

    @classmethod
    def adopt(cls, model: GPTModel, lm_head_mini_sequences: ChunkCount = AUTO,
              offload_layer_inputs: bool = False) -> "MSTGPTModel":
        """Promote a stock ``GPTModel`` that a tool built itself (e.g. a Megatron-Bridge provider) to
        this class in place, and return it: same object, parameters and state-dict keys."""
        if type(model) is not GPTModel:
            raise TypeError(f"model must be a megatron-core GPTModel (unwrapped), got {type(model).__name__}")
        lm_head_mini_sequences = check_head_options(model.config, lm_head_mini_sequences)
        check_offload_options(model.config, offload_layer_inputs)
        model.__class__ = cls
        if model.post_process:
            MiniSequenceLMHead.adopt(model.output_layer, lm_head_mini_sequences)
        model._offload_layer_inputs(offload_layer_inputs)
        return model

    def _loss_in_head(self, labels, inference_context) -> bool:
        """Whether this forward's loss is computed by the mini-sequence head (else: stock path)."""
        return (
            labels is not None
            and self.post_process
            and self.config.mtp_num_layers is None  # multi-token prediction: stock branch
            and not (inference_context is not None and not self.training)  # stock's inference mode
            and not has_config_logger_enabled(self.config)  # it dumps the logits
        )

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """The stock ``_postprocess``, except that with labels the head returns the loss directly."""
        if not self._loss_in_head(labels, kwargs.get("inference_context")):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        output_weight = None
        if self.share_embeddings_and_output_weights:
            output_weight = self.shared_embedding_or_output_weight()
        loss, _ = self.output_layer(hidden_states, weight=output_weight, labels=labels)
        return loss


def check_offload_options(config: TransformerConfig, offload_layer_inputs: bool) -> None:
    """``offload_layer_inputs`` is a bool and has full recompute to work with."""
    if not isinstance(offload_layer_inputs, bool):
        raise ValueError(f"offload_layer_inputs must be True or False, got {offload_layer_inputs!r}")
    if offload_layer_inputs and config.recompute_granularity != "full":
        raise ValueError(
            f"offload_layer_inputs=True (--offload-layer-inputs) moves the layer inputs that full recompute "
            f"keeps; it needs recompute_granularity='full', got {config.recompute_granularity!r}"
        )


def _offload_inside(decoder, offload: HostOffload) -> None:
    """Run every forward of ``decoder`` inside one :meth:`HostOffload.scope`, its final norm paused
    (under full recompute what is left for the scope is what the layers' checkpoints save)."""
    _hook_context(decoder, offload.scope)
    if getattr(decoder, "final_layernorm", None) is not None:
        _hook_context(decoder.final_layernorm, offload.pause)


def _hook_context(module, make_context) -> None:
    """Enter a fresh ``make_context()`` before each forward of ``module``; leave it after, even on error."""
    entered = []

    def enter(module, args, kwargs):
        context = make_context()
        context.__enter__()
        entered.append(context)

    def leave(module, args, kwargs, output):
        entered.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave, with_kwargs=True, always_call=True)
