"""Mini-sequence MLP: megatron-core's ``MLP`` run over the sequence in chunks recomputed in backward,
with the stock parameters and state dicts (docs/design.md#mlp-under-full-recompute)."""

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from mst_megatron.layout import mlp_chunk_count
from mst_megatron.ops.chunking import AUTO, ChunkCount, validate_chunk_count
from mst_megatron.ops.mini_sequence import GemmsLeftEmpty, mini_sequence_apply
from mst_megatron.runtime.mcore_adapter import MLP_TAKES_NAME

__all__ = ["MiniSequenceMLP"]

PARAM = "mlp_mini_sequences"


class MiniSequenceMLP(MLP):
    """``MLP`` whose forward runs in :meth:`num_chunks` chunks of the local sequence.

    Args (besides ``MLP``'s):
        mlp_mini_sequences: int >= 1 or ``"auto"`` (``ceil(s_local * sp / hidden_size)``, ``sp`` the
            TP size under SP, else 1); clamped to the local length; ``1`` is the stock path.
    Raises ``ValueError`` for MoE, ``tp_comm_overlap`` or fine-grained activation offloading.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        is_expert: bool = False,
        input_size: Optional[int] = None,
        ffn_hidden_size: Optional[int] = None,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
        mlp_mini_sequences: ChunkCount = AUTO,
        pg_collection: Optional[ProcessGroupCollection] = None,
        is_mtp_layer: bool = False,
        name: Optional[str] = None,
    ):
        _check_config(config, is_expert)
        mlp_mini_sequences = validate_chunk_count(mlp_mini_sequences, PARAM)
        if tp_group is None:
            # megatron-core 0.16 passes an MLP subclass only `config`: the default TP group then.
            tp_group = parallel_state.get_tensor_model_parallel_group() if pg_collection is None else pg_collection.tp
        super().__init__(
            config,
            submodules,
            is_expert=is_expert,
            input_size=input_size,
            ffn_hidden_size=config.ffn_hidden_size if ffn_hidden_size is None else ffn_hidden_size,
            tp_group=tp_group,
            **({"name": name} if MLP_TAKES_NAME else {}),
        )
        self.mlp_mini_sequences = mlp_mini_sequences

    def num_chunks(self, local_length: int) -> int:
        """Chunk count for a local sequence of ``local_length`` tokens (same on every TP/SP/CP rank)."""
        sp_size = self.tp_group.size() if self.config.sequence_parallel else 1
        return mlp_chunk_count(self.mlp_mini_sequences, local_length, sp_size, self.config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        """``[s_local, b, h]`` -> ``(output [s_local, b, h], output_bias or None)``, like ``MLP``."""
        num_chunks = self.num_chunks(hidden_states.size(0))
        if num_chunks == 1:
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        if per_token_scale is not None:
            raise ValueError(
                f"per_token_scale (MoE expert scaling) cannot be used with {PARAM}={num_chunks}; "
                f"set {PARAM}=1"
            )
        # Extra kwargs (e.g. padding_mask) are for MoE layers; the dense MLP ignores them.
        recompute = self._recompute_without_fc2_gemm if type(self.linear_fc2) is RowParallelLinear else None
        return mini_sequence_apply(super().forward, hidden_states, num_chunks, recompute_fn=recompute,
                                   outputs_unread=self._in_layer_recompute_ending_checkpoint())

    def _in_layer_recompute_ending_checkpoint(self) -> bool:
        """True while megatron's full recompute re-runs this layer in backward and it is alone in its
        checkpoint: the MLP's output values are then unread (docs/design.md#mlp-under-full-recompute)."""
        config = self.config
        one_layer_per_checkpoint = config.recompute_method == "block" or config.recompute_num_layers == 1
        return (
            config.recompute_granularity == "full"
            and one_layer_per_checkpoint
            and torch.is_grad_enabled()
            and tensor_parallel.random.is_checkpointing()
        )

    def _recompute_without_fc2_gemm(self, hidden_states: torch.Tensor):
        """The stock forward for a chunk's recompute with fc2's product left uncomputed: backward reads
        fc2's input and weight, never its output. Saves the same tensors as the stock forward."""
        fc2 = self.linear_fc2
        fc2_forward = fc2.forward

        def forward_leaving_gemms_empty(*args, **kwargs):
            with GemmsLeftEmpty():
                return fc2_forward(*args, **kwargs)

        fc2.forward = forward_leaving_gemms_empty
        try:
            return MLP.forward(self, hidden_states)
        finally:
            del fc2.forward


def _check_config(config: TransformerConfig, is_expert: bool) -> None:
    """Refuse the settings chunking cannot honour, naming them."""
    if is_expert or config.num_moe_experts is not None:
        raise ValueError(
            f"MiniSequenceMLP is a dense MLP: num_moe_experts={config.num_moe_experts} (MoE layers) "
            "is not supported by the MST layer spec; set num_moe_experts=None"
        )
    if config.tp_comm_overlap:
        raise ValueError(
            "tp_comm_overlap=True cannot be combined with MiniSequenceMLP: Transformer Engine's "
            "overlap buffers are sized for the whole sequence; set tp_comm_overlap=False"
        )
    if config.fine_grained_activation_offloading:  # a field in megatron-core 0.16.1 and 0.19.2
        raise ValueError(
            "fine_grained_activation_offloading=True (megatron's CUDA-stream offload of module inputs) "
            "is not supported with the MST layer spec: its offload points were not verified against the "
            "chunked MLP's per-chunk recompute; set fine_grained_activation_offloading=False"
        )
