"""Parallel-size planning: which TP/PP/CP/SP layout to ask for, and how much memory per GPU to expect.

:func:`check_layout` is the rule every launch input obeys: tensor parallelism stays within a node
(its all-reduces need the node's fast links), and the world (nodes x GPUs per node) must divide by
TP x PP x CP, the rest being data parallelism. :func:`suggest` tries every such layout for a model
shape and sequence length, estimates its per-GPU peak memory with :func:`estimate_memory`, and ranks
the ones that fit.

The memory model is an estimate on paper, not a measurement. Its assumptions:

* bf16 weights (2 bytes/param), fp32 gradient buffers (4, megatron DDP with
  ``grad_reduce_in_fp32``), Adam with fp32 master weights and two moments (12), the latter split
  over the data- and context-parallel ranks with the distributed optimizer;
* the worst pipeline stage: its share of the layers plus the embedding (first stage) or the
  output layer and final norm (last stage), all divided by TP (the vocabulary is TP-sharded);
* full activation recomputation, sequence parallelism whenever TP > 1, micro-batch size 1, and the
  1F1B schedule, so the first stage keeps PP micro-batches of layer inputs: in all, ``num_layers``
  layer inputs of ``[S / (CP x TP), h]`` each;
* on top of that, the larger of two working sets: one layer's recompute with flash attention (the
  output projection's whole-sequence partial sums before their reduce-scatter, QKV, attention output,
  the ring-attention key/value buffers under CP, one MST chunk of the MLP, each with its gradient),
  or the MST LM head (its input shard, one SP-gathered chunk of it and that chunk's fp32 logits, each
  with its gradient, and its fp32 weight-gradient sum);
* no allowance for the allocator's fragmentation, communication buffers or the CUDA context: that
  is what ``reserve`` (a share of the GPU kept free) is for.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

from mst_megatron.launch import LaunchError
from mst_megatron.ops.chunking import AUTO, ChunkCount

GIB = 1024**3
BF16, FP32 = 2, 4


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_layout(nodes: int, gpus_per_node: int, tp: int, pp: int, cp: int) -> int:
    """Check TP/PP/CP against ``nodes`` x ``gpus_per_node`` and return the data-parallel size."""
    sizes = {"nodes": nodes, "GPUs per node": gpus_per_node, "--tensor-model-parallel-size": tp,
             "--pipeline-model-parallel-size": pp, "--context-parallel-size": cp}
    for name, value in sizes.items():
        if value < 1:
            raise LaunchError(f"{name} must be >= 1, got {value}")
    if gpus_per_node % tp:
        raise LaunchError(
            f"--tensor-model-parallel-size {tp} must divide the {gpus_per_node} GPUs per node: tensor "
            f"parallelism stays within a node; use one of {_divisors(gpus_per_node)}"
        )
    world = nodes * gpus_per_node
    if world % (tp * pp * cp):
        raise LaunchError(
            f"{nodes} nodes x {gpus_per_node} GPUs = {world} GPUs is not divisible by "
            f"--tensor-model-parallel-size ({tp}) x --pipeline-model-parallel-size ({pp}) x "
            f"--context-parallel-size ({cp}) = {tp * pp * cp}"
        )
    return world // (tp * pp * cp)


@dataclass(frozen=True)
class Layout:
    """One parallel layout and the numbers the memory model derives for it (bytes, per GPU)."""

    tp: int
    pp: int
    cp: int
    dp: int
    mlp_chunks: int
    mlp_chunk_tokens: int
    head_chunks: int
    head_chunk_tokens: int
    memory: Dict[str, float]

    @property
    def peak(self) -> float:
        return sum(self.memory.values())

    def flags(self, shape, seq_length: int, mlp_mini_sequences: ChunkCount, lm_head_mini_sequences: ChunkCount,
              distributed_optimizer: bool) -> List[str]:
        """The pretraining flags (Megatron-LM names) that run this layout."""
        flags = ["--max-position-embeddings", str(seq_length)] if seq_length > shape.max_position_embeddings else []
        flags += ["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp),
                 "--context-parallel-size", str(self.cp)]
        flags += ["--sequence-parallel"] if self.tp > 1 else []
        flags += ["--seq-length", str(seq_length), "--micro-batch-size", "1",
                  "--mlp-mini-sequences", str(mlp_mini_sequences),
                  "--lm-head-mini-sequences", str(lm_head_mini_sequences), "--bf16",
                  "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
        return flags + (["--use-distributed-optimizer"] if distributed_optimizer else [])


def estimate_memory(shape, seq_length: int, tp: int, pp: int, cp: int, dp: int,
                    mlp_mini_sequences: ChunkCount = AUTO, lm_head_mini_sequences: ChunkCount = AUTO,
                    distributed_optimizer: bool = True) -> Layout:
    """Per-GPU peak memory of one layout under the assumptions of the module docstring."""
    from mst_megatron.runtime.quiet import import_megatron_quietly

    import_megatron_quietly()
    from mst_megatron.modules.lm_head import lm_head_mini_sequence_count
    from mst_megatron.modules.mlp import mlp_mini_sequence_count
    from mst_megatron.training.model_config import padded_vocab_size

    h, L, ffn = shape.hidden_size, shape.num_layers, shape.ffn_hidden_size
    vocab = padded_vocab_size(shape.vocab_size, 128, tp)
    per_layer = (shape.parameter_count(0) - h) // L  # parameter_count(0): no embeddings, one final norm
    embedding = vocab * h
    # The output layer: its own weight, or on a later stage a copy of the tied embedding.
    head = 0 if shape.share_embeddings_and_output_weights and pp == 1 else embedding
    stage = L // pp * per_layer
    params = (stage + embedding + head + h if pp == 1 else stage + max(embedding, head + h)) / tp
    optimizer_shards = dp * cp if distributed_optimizer else 1

    s_cp = seq_length // cp  # tokens on each CP rank; TP ranks share them under SP
    s_local = s_cp // tp
    mlp_chunks = mlp_mini_sequence_count(mlp_mini_sequences, s_local, tp, h)  # SP whenever TP > 1
    mlp_tokens = math.ceil(s_cp / mlp_chunks)
    head_chunks = lm_head_mini_sequence_count(lm_head_mini_sequences, s_local, tp, h, vocab // tp)
    head_tokens = math.ceil(s_cp / head_chunks)
    kv = 2 * shape.num_query_groups * (h // shape.num_attention_heads)
    layer_set = s_cp * (h + (h + kv) / tp + h / tp + (2 * kv / tp if cp > 1 else 0)) * BF16
    layer_set += mlp_tokens * (h + 3 * ffn / tp) * BF16 + 4 * s_local * h * BF16  # MLP chunk; residual stream
    # The input shard, one gathered chunk of it and that chunk's fp32 logits.
    head_set = s_local * h * BF16 + head_tokens * (h * BF16 + vocab // tp * FP32)
    head_dw_sum = vocab // tp * h * FP32  # the head's fp32 weight-gradient sum, formed in forward
    memory = {
        "weights": params * BF16,
        "gradients": params * FP32,
        "optimizer": params * 3 * FP32 / optimizer_shards,
        "stored layer inputs": L * s_local * h * BF16,
        "working set": max(2 * layer_set, 2 * head_set + head_dw_sum),  # each tensor and its gradient
    }
    return Layout(tp, pp, cp, dp, mlp_chunks, mlp_tokens, head_chunks, head_tokens, memory)


def candidate_layouts(shape, nodes: int, gpus_per_node: int, seq_length: int,
                      tp: Optional[int] = None, pp: Optional[int] = None, cp: Optional[int] = None) -> List[tuple]:
    """Every (TP, PP, CP, DP) the model and cluster allow; a given size pins that dimension."""
    world = nodes * gpus_per_node
    found = []
    for t in [tp] if tp else _divisors(gpus_per_node):
        if shape.num_attention_heads % t or shape.num_query_groups % t:
            continue
        for p in [pp] if pp else _divisors(shape.num_layers):
            for c in [cp] if cp else _divisors(world):
                if world % (t * p * c) or seq_length % (t * c * (2 if c > 1 else 1)):
                    continue  # CP splits the sequence in 2 x CP load-balanced pieces, SP in TP shards
                found.append((t, p, c, world // (t * p * c)))
    return found


def suggest(shape, nodes: int, gpus_per_node: int, seq_length: int, gpu_memory_gib: float,
            reserve: float = 0.15, tp: Optional[int] = None, pp: Optional[int] = None, cp: Optional[int] = None,
            mlp_mini_sequences: ChunkCount = AUTO, lm_head_mini_sequences: ChunkCount = AUTO,
            distributed_optimizer: bool = True) -> List[Layout]:
    """Layouts that fit ``(1 - reserve) x gpu_memory_gib``, best first: the most data parallelism
    (least model parallelism to communicate), then the fewest pipeline stages (bubbles), then the
    smallest CP (ring traffic across nodes), then the lowest memory. Raises when none fits."""
    if shape.vocab_size is None:
        raise LaunchError("the model config has vocab_size null (the tokenizer's): set it to plan memory")
    if seq_length < 1 or gpu_memory_gib <= 0 or not 0 <= reserve < 1:
        raise LaunchError(f"need --seq-length >= 1 (got {seq_length}), --gpu-memory-gib > 0 (got "
                          f"{gpu_memory_gib}) and 0 <= --reserve < 1 (got {reserve})")
    check_layout(nodes, gpus_per_node, tp or 1, pp or 1, cp or 1)  # the cluster, and any pinned sizes
    candidates = candidate_layouts(shape, nodes, gpus_per_node, seq_length, tp, pp, cp)
    if not candidates:
        raise LaunchError(
            f"no layout of {nodes} x {gpus_per_node} GPUs fits the model (heads {shape.num_attention_heads}, "
            f"query groups {shape.num_query_groups}, layers {shape.num_layers}) and --seq-length {seq_length}"
        )
    budget = (1 - reserve) * gpu_memory_gib * GIB
    layouts = [estimate_memory(shape, seq_length, *c, mlp_mini_sequences, lm_head_mini_sequences,
                               distributed_optimizer) for c in candidates]
    fitting = sorted((x for x in layouts if x.peak <= budget), key=lambda x: (-x.dp, x.pp, x.cp, x.peak))
    if not fitting:
        best = min(layouts, key=lambda x: x.peak)
        raise LaunchError(
            f"no layout fits {budget / GIB:.1f} GiB per GPU; the leanest (TP={best.tp} PP={best.pp} "
            f"CP={best.cp}) needs {best.peak / GIB:.1f} GiB: add nodes or shorten --seq-length"
        )
    return fitting


def describe(shape, name: str, layouts: List[Layout], nodes: int, gpus_per_node: int, seq_length: int,
             gpu_memory_gib: float, reserve: float, mlp_mini_sequences: ChunkCount = AUTO,
             lm_head_mini_sequences: ChunkCount = AUTO, distributed_optimizer: bool = True,
             alternatives: int = 3) -> str:
    """The report ``scripts/plan_parallel.py`` prints: the best layout, its flags, then runners-up."""
    best = layouts[0]
    lines = [
        f"model {name}: {shape.parameter_count(shape.vocab_size) / 1e9:.2f}B parameters, {shape.num_layers} "
        f"layers, hidden {shape.hidden_size}, vocab {shape.vocab_size}",
        f"cluster: {nodes} node(s) x {gpus_per_node} GPUs, {gpu_memory_gib:g} GiB each "
        f"({(1 - reserve) * gpu_memory_gib:.1f} GiB planned, {reserve:.0%} reserve); sequence {seq_length} tokens, "
        f"micro-batch 1, bf16, full recompute, {'distributed' if distributed_optimizer else 'replicated'} optimizer",
        f"suggested: TP={best.tp} (within a node) PP={best.pp} CP={best.cp} DP={best.dp}, "
        f"sequence parallel {'on' if best.tp > 1 else 'off (TP=1)'}",
        f"MST: mlp_mini_sequences={mlp_mini_sequences} -> {best.mlp_chunks} chunks of {best.mlp_chunk_tokens} "
        f"tokens; lm_head_mini_sequences={lm_head_mini_sequences} -> {best.head_chunks} chunks of "
        f"{best.head_chunk_tokens} tokens",
        f"expected peak per GPU: {best.peak / GIB:.1f} GiB = "
        + " + ".join(f"{k} {v / GIB:.1f}" for k, v in best.memory.items()),
        "flags: " + " ".join(best.flags(shape, seq_length, mlp_mini_sequences, lm_head_mini_sequences,
                                        distributed_optimizer)),
    ]
    for other in layouts[1:1 + alternatives]:
        lines.append(f"  also fits: TP={other.tp} PP={other.pp} CP={other.cp} DP={other.dp}: "
                     f"{other.peak / GIB:.1f} GiB")
    return "\n".join(lines)


def build_parser():
    import argparse

    from mst_megatron.training.arguments import int_or_auto_arg  # the training flags' parser

    p = argparse.ArgumentParser(
        description="Suggest a TP/PP/CP/SP layout with MST counts and the per-GPU memory it expects "
                    "(an estimate on paper: see mst_megatron/launch/plan.py for its assumptions).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", required=True, help="model JSON: a path, or a name from examples/configs")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--seq-length", type=int, required=True, help="tokens per sequence")
    p.add_argument("--gpu-memory-gib", type=float, required=True, help="memory of one GPU")
    p.add_argument("--reserve", type=float, default=0.15, help="share of each GPU's memory left unplanned")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None, help="pin TP (default: search)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=None, help="pin PP (default: search)")
    p.add_argument("--context-parallel-size", type=int, default=None, help="pin CP (default: search)")
    p.add_argument("--mlp-mini-sequences", type=int_or_auto_arg, default=AUTO)
    p.add_argument("--lm-head-mini-sequences", type=int_or_auto_arg, default=AUTO)
    p.add_argument("--no-distributed-optimizer", action="store_true", help="replicated Adam states")
    return p


def main(argv: Optional[List[str]] = None, configs_dir: Optional[str] = None) -> int:
    """CLI entry (``scripts/plan_parallel.py``): prints the plan; 2 with a one-line message on bad input."""
    import sys

    from mst_megatron.training import SetupError
    from mst_megatron.training.model_config import load_model_shape

    a = build_parser().parse_args(argv)
    try:
        shape = load_model_shape(a.config, configs_dir)
        options = dict(mlp_mini_sequences=a.mlp_mini_sequences, lm_head_mini_sequences=a.lm_head_mini_sequences,
                       distributed_optimizer=not a.no_distributed_optimizer)
        layouts = suggest(shape, a.nodes, a.gpus_per_node, a.seq_length, a.gpu_memory_gib, a.reserve,
                          a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.context_parallel_size,
                          **options)
    except (LaunchError, SetupError) as e:
        print(f"plan_parallel.py: error: {e}", file=sys.stderr)
        return 2
    print(describe(shape, a.config, layouts, a.nodes, a.gpus_per_node, a.seq_length, a.gpu_memory_gib, a.reserve,
                   **options))
    return 0
