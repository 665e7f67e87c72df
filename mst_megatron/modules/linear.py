"""Column-parallel linear gathering its SP input one chunk at a time (docs/design.md#qkv-projection)."""

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear

from mst_megatron.ops.chunking import AUTO, chunk_sizes, local_chunk_count

__all__ = ["MiniSequenceColumnParallelLinear"]


class MiniSequenceColumnParallelLinear(ColumnParallelLinear):
    """The stock layer (parameters, state dicts), under SP run on chunks of ~``input_size`` gathered tokens."""

    def num_chunks(self, local_length: int) -> int:
        """Chunks of a local sequence of ``local_length`` tokens (1 without sequence parallelism)."""
        if not self.sequence_parallel:
            return 1
        return local_chunk_count(AUTO, type(self).__name__, local_length, self.tp_group.size(), self.input_size)

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        """``[s_local, b, h]`` -> ``(output [s, b, n/TP] in gathered order, output_bias or None)``."""
        num_chunks = self.num_chunks(input_.size(0))
        if num_chunks == 1:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        outputs = []
        for chunk in torch.split(input_, chunk_sizes(input_.size(0), num_chunks)):
            output, output_bias = super().forward(chunk, weight=weight, runtime_gather_output=runtime_gather_output)
            outputs.append(output.unflatten(0, (self.tp_group.size(), chunk.size(0))))  # [TP, chunk, ...]
        return torch.cat(outputs, dim=1).flatten(0, 1), output_bias
