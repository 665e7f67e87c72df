"""Column-parallel linear that all-gathers its sequence-parallel input one chunk at a time.

Under sequence parallelism megatron's ``ColumnParallelLinear`` all-gathers its whole input shard
``[s/TP, b, h]`` to ``[s, b, h]`` before the GEMM, in forward and again in backward, into megatron's
global memory buffer, which then stays allocated at that size for the rest of training. In the MST
layer that layer is the attention's QKV projection (the MLP's fc1 already runs per chunk inside
:class:`~mst_megatron.modules.mlp.MiniSequenceMLP`), and its gathered input is an ``h``-wide tensor of
the whole sequence that TP does not shard: under TP=2 it was about a tenth of a training step's
activations (``benchmarks/bench_context_parallel.py``). Running the stock layer on chunks of the local
shard gathers one chunk at a time, so the buffer is one chunk big.

A linear layer is per-token, so chunking is exact. A chunk is the same rows of every TP rank's shard,
and its output holds them rank after rank; the chunk outputs are interleaved back into the order of
the gathered sequence (one copy of the output, which has ``1/TP`` of the heads). Backward keeps what
the stock layer keeps (each chunk's input is a view of the shard). Parameters, ``state_dict`` and
``sharded_state_dict`` are the stock layer's.
"""

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear

from mst_megatron.ops.chunking import AUTO, chunk_sizes, local_chunk_count

__all__ = ["MiniSequenceColumnParallelLinear"]


class MiniSequenceColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` that under sequence parallelism runs on chunks of the local shard of
    about ``input_size`` gathered tokens each (the MLP's ``"auto"`` rule); the stock layer otherwise.
    Every rank of the TP group has the same local length, hence the same chunks."""

    def num_chunks(self, local_length: int) -> int:
        """Chunks of a local sequence of ``local_length`` tokens (1 without sequence parallelism)."""
        if not self.sequence_parallel:
            return 1
        return local_chunk_count(AUTO, type(self).__name__, local_length, self.tp_group.size(), self.input_size)

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        """``[s_local, b, h]`` -> ``(output [s, b, n/TP], output_bias or None)``, like the stock layer."""
        num_chunks = self.num_chunks(input_.size(0))
        if num_chunks == 1:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        outputs = []
        for chunk in torch.split(input_, chunk_sizes(input_.size(0), num_chunks)):
            output, output_bias = super().forward(chunk, weight=weight, runtime_gather_output=runtime_gather_output)
            outputs.append(output.unflatten(0, (self.tp_group.size(), chunk.size(0))))  # [TP, chunk, ...]
        # Every chunk of rank 0's rows, then of rank 1's, ...: the gathered sequence.
        return torch.cat(outputs, dim=1).flatten(0, 1), output_bias
