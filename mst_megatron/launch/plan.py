"""Parallel-size planning: which TP/PP/CP/SP layout to ask for, and how much memory per GPU to expect.

:func:`suggest` tries every :class:`~mst_megatron.layout.ParallelLayout` of a cluster (TP within a
node) that the model shape and sequence length allow, estimates its per-GPU peak memory with
:func:`estimate_memory`, and ranks the ones that fit.

The memory model is an estimate on paper, not a measurement; its assumptions are in
``docs/design.md`` (planner memory model).
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

from mst_megatron.launch import LaunchError
from mst_megatron.layout import LayoutError, ParallelLayout, divisors, head_chunk_count, mlp_chunk_count
from mst_megatron.ops.chunking import AUTO, ChunkCount

GIB = 1024**3
BF16, FP32 = 2, 4
PLANNED_CP_COMM_TYPES = ("a2a", "p2p")
ALTERNATIVES = 3  # runners-up the report lists


@dataclass(frozen=True)
class Estimate:
    """One parallel layout and the numbers the memory model derives for it (bytes, per GPU)."""

    layout: ParallelLayout
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
        x = self.layout
        flags = ["--max-position-embeddings", str(seq_length)] if seq_length > shape.max_position_embeddings else []
        flags += ["--tensor-model-parallel-size", str(x.tp), "--pipeline-model-parallel-size", str(x.pp),
                  "--context-parallel-size", str(x.cp)]
        flags += ["--cp-comm-type", x.cp_comm_type] if x.cp > 1 else []
        flags += ["--sequence-parallel"] if x.sp else []
        flags += ["--seq-length", str(seq_length), "--micro-batch-size", "1",
                  "--mlp-mini-sequences", str(mlp_mini_sequences),
                  "--lm-head-mini-sequences", str(lm_head_mini_sequences), "--bf16",
                  "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
        return flags + (["--use-distributed-optimizer"] if distributed_optimizer else [])


def estimate_memory(shape, seq_length: int, layout: ParallelLayout,
                    mlp_mini_sequences: ChunkCount = AUTO, lm_head_mini_sequences: ChunkCount = AUTO,
                    distributed_optimizer: bool = True) -> Estimate:
    """Per-GPU peak memory of ``layout`` (the model in ``docs/design.md``, planner memory model)."""
    tp, pp, cp, dp = layout.tp, layout.pp, layout.cp, layout.dp
    h, L, ffn = shape.hidden_size, shape.num_layers, shape.ffn_hidden_size
    vocab = layout.padded_vocab_size(shape.vocab_size)
    per_layer = (shape.parameter_count(0) - h) // L  # parameter_count(0): no embeddings, one final norm
    embedding = vocab * h
    # The output layer: its own weight, or on a later stage a copy of the tied embedding.
    head = 0 if shape.share_embeddings_and_output_weights and pp == 1 else embedding
    stage = L // pp * per_layer
    params = (stage + embedding + head + h if pp == 1 else stage + max(embedding, head + h)) / tp
    optimizer_shards = dp * cp if distributed_optimizer else 1

    s_cp = seq_length // cp  # tokens on each CP rank; TP ranks share them under SP
    s_local = s_cp // tp
    mlp_chunks = mlp_chunk_count(mlp_mini_sequences, s_local, layout.sp_size, h)
    mlp_tokens = math.ceil(s_cp / mlp_chunks)
    head_chunks = head_chunk_count(lm_head_mini_sequences, s_local, layout.sp_size, h, vocab // tp)
    head_tokens = math.ceil(s_cp / head_chunks)
    kv = 2 * shape.num_query_groups * (h // shape.num_attention_heads)  # key and value widths
    exchange = 0.0  # the CP exchange's buffers per token
    if layout.a2a_size > 1:
        exchange += (2 * h + kv) / tp * BF16
    if layout.ring_size > 1:
        exchange += 4 * kv / tp * BF16 + (h / tp + shape.num_attention_heads / tp) * FP32
    layer_set = s_cp * ((h + (h + kv) / tp + h / tp) * BF16 + exchange)
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
    return Estimate(layout, mlp_chunks, mlp_tokens, head_chunks, head_tokens, memory)


def candidate_layouts(shape, nodes: int, gpus_per_node: int, seq_length: int, tp: Optional[int] = None,
                      pp: Optional[int] = None, cp: Optional[int] = None,
                      cp_comm_type: str = "a2a") -> List[ParallelLayout]:
    """Every layout the model and cluster allow (sequence parallelism whenever TP > 1); a given size
    pins that dimension."""
    world = nodes * gpus_per_node
    found = []
    for t in [tp] if tp else divisors(gpus_per_node):
        for p in [pp] if pp else divisors(shape.num_layers):
            for c in [cp] if cp else divisors(world):
                if world % (t * p * c):
                    continue
                try:
                    x = ParallelLayout.for_cluster(nodes, gpus_per_node, t, p, c, sp=t > 1,
                                                   cp_comm_type=cp_comm_type)
                    x.check_seq_length(seq_length)
                    x.check_heads(shape.num_attention_heads, shape.num_query_groups)
                    x.check_layers(shape.num_layers)
                except LayoutError:
                    continue
                found.append(x)
    return found


def suggest(shape, nodes: int, gpus_per_node: int, seq_length: int, gpu_memory_gib: float,
            reserve: float = 0.15, tp: Optional[int] = None, pp: Optional[int] = None, cp: Optional[int] = None,
            mlp_mini_sequences: ChunkCount = AUTO, lm_head_mini_sequences: ChunkCount = AUTO,
            distributed_optimizer: bool = True, cp_comm_type: str = "a2a") -> List[Estimate]:
    """Layouts that fit ``(1 - reserve) x gpu_memory_gib``, best first: the most data parallelism
    (least model parallelism to communicate), then the fewest pipeline stages (bubbles), then the
    smallest CP (its exchange crosses nodes first), then the lowest memory. Raises
    :class:`~mst_megatron.layout.LayoutError` for a cluster the pinned sizes do not fit,
    :class:`~mst_megatron.launch.LaunchError` when no layout fits."""
    if shape.vocab_size is None:
        raise LaunchError("the model config has vocab_size null (the tokenizer's): set it to plan memory")
    if seq_length < 1 or gpu_memory_gib <= 0 or not 0 <= reserve < 1:
        raise LaunchError(f"need --seq-length >= 1 (got {seq_length}), --gpu-memory-gib > 0 (got "
                          f"{gpu_memory_gib}) and 0 <= --reserve < 1 (got {reserve})")
    if cp_comm_type not in PLANNED_CP_COMM_TYPES:
        raise LaunchError(f"--cp-comm-type must be one of {PLANNED_CP_COMM_TYPES} for planning, got {cp_comm_type!r}")
    ParallelLayout.for_cluster(nodes, gpus_per_node, tp or 1, pp or 1, cp or 1)  # the cluster, and any pinned sizes
    candidates = candidate_layouts(shape, nodes, gpus_per_node, seq_length, tp, pp, cp, cp_comm_type)
    if not candidates:
        raise LaunchError(
            f"no layout of {nodes} x {gpus_per_node} GPUs fits the model (heads {shape.num_attention_heads}, "
            f"query groups {shape.num_query_groups}, layers {shape.num_layers}) and --seq-length {seq_length} "
            f"with --cp-comm-type {cp_comm_type}"
        )
    budget = (1 - reserve) * gpu_memory_gib * GIB
    estimates = [estimate_memory(shape, seq_length, x, mlp_mini_sequences, lm_head_mini_sequences,
                                 distributed_optimizer) for x in candidates]
    fitting = sorted((e for e in estimates if e.peak <= budget),
                     key=lambda e: (-e.layout.dp, e.layout.pp, e.layout.cp, e.peak))
    if not fitting:
        best = min(estimates, key=lambda e: e.peak)
        raise LaunchError(
            f"no layout fits {budget / GIB:.1f} GiB per GPU; the leanest (TP={best.layout.tp} PP={best.layout.pp} "
            f"CP={best.layout.cp}) needs {best.peak / GIB:.1f} GiB: add nodes or shorten --seq-length"
        )
    return fitting


def _sizes(x: ParallelLayout) -> str:
    cp = f"CP={x.cp}" + (f" ({x.cp_comm_type})" if x.cp > 1 else "")
    return f"TP={x.tp} PP={x.pp} {cp} DP={x.dp}"


def describe(shape, name: str, estimates: List[Estimate], nodes: int, gpus_per_node: int, seq_length: int,
             gpu_memory_gib: float, reserve: float, mlp_mini_sequences: ChunkCount = AUTO,
             lm_head_mini_sequences: ChunkCount = AUTO, distributed_optimizer: bool = True,
             alternatives: int = ALTERNATIVES) -> str:
    """The report ``scripts/plan_parallel.py`` prints: the best layout, its flags, then runners-up."""
    best = estimates[0]
    x = best.layout
    lines = [
        f"model {name}: {shape.parameter_count(shape.vocab_size) / 1e9:.2f}B parameters, {shape.num_layers} "
        f"layers, hidden {shape.hidden_size}, vocab {shape.vocab_size}",
        f"cluster: {nodes} node(s) x {gpus_per_node} GPUs, {gpu_memory_gib:g} GiB each "
        f"({(1 - reserve) * gpu_memory_gib:.1f} GiB planned, {reserve:.0%} reserve); sequence {seq_length} tokens, "
        f"micro-batch 1, bf16, full recompute, {'distributed' if distributed_optimizer else 'replicated'} optimizer",
        f"suggested: {_sizes(x)} (TP within a node), sequence parallel {'on' if x.sp else 'off (TP=1)'}",
        f"MST: mlp_mini_sequences={mlp_mini_sequences} -> {best.mlp_chunks} chunks of {best.mlp_chunk_tokens} "
        f"tokens; lm_head_mini_sequences={lm_head_mini_sequences} -> {best.head_chunks} chunks of "
        f"{best.head_chunk_tokens} tokens",
        f"expected peak per GPU: {best.peak / GIB:.1f} GiB = "
        + " + ".join(f"{k} {v / GIB:.1f}" for k, v in best.memory.items()),
        "flags: " + " ".join(best.flags(shape, seq_length, mlp_mini_sequences, lm_head_mini_sequences,
                                        distributed_optimizer)),
    ]
    for other in estimates[1:1 + alternatives]:
        lines.append(f"  also fits: {_sizes(other.layout)}: {other.peak / GIB:.1f} GiB")
    return "\n".join(lines)


def simulate_estimates(shape, config: str, estimates: List[Estimate], nodes: int, gpus_per_node: int, seq_length: int,
                       gpu_memory_gib: float, reserve: float, mlp_mini_sequences: ChunkCount = AUTO,
                       lm_head_mini_sequences: ChunkCount = AUTO, distributed_optimizer: bool = True) -> List[Dict]:
    """Each estimate's layout run through the simulator (:mod:`mst_megatron.simulate`: the job's model,
    DDP, optimizer and step at full size under fake tensors, CUDA's kernels) with the flags the plan
    prints; the simulator's reports, in order. ``config`` names the model JSON as ``--model-config`` does.
    Imports megatron-core (the rest of this module does not)."""
    from mst_megatron import simulate

    reports = []
    for e in estimates:
        flags = e.flags(shape, seq_length, mlp_mini_sequences, lm_head_mini_sequences, distributed_optimizer)
        args, sim_shape = simulate.parse(["--model-config", config, "--world-size", str(nodes * gpus_per_node),
                                      "--gpu-memory-gib", str(gpu_memory_gib), "--reserve", str(reserve), *flags])
        reports.append(simulate.simulate(args, sim_shape, seq_length))
    return reports


def describe_simulated(estimates: List[Estimate], reports: List[Dict]) -> str:
    """One line per simulated layout: the simulated peak beside the formula's, and the formula's error."""
    lines = ["simulated (mst_megatron.simulate, the busiest rank of one full step):"]
    for e, r in zip(estimates, reports):
        peak = r["busiest"]["memory"]["peak"]
        lines.append(f"  {_sizes(e.layout)}: {peak / GIB:.2f} GiB ({'fits' if r['fits'] else 'does NOT fit'}); "
                     f"formula {e.peak / GIB:.2f} GiB, error {e.peak / peak - 1:+.1%}")
    return "\n".join(lines)


def build_parser():
    import argparse

    from mst_megatron.training.arguments import int_or_auto_arg  # the training flags' parser

    p = argparse.ArgumentParser(
        description="Suggest a TP/PP/CP/SP layout with MST counts and the per-GPU memory it expects "
                    "(an estimate on paper: docs/design.md lists its assumptions).",
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
    p.add_argument("--simulate", action="store_true",
                   help="also run the suggested layout and the runners-up printed through the simulator "
                        "(mst_megatron.simulate) and print their simulated peaks and the formula's error")
    p.add_argument("--cp-comm-type", choices=PLANNED_CP_COMM_TYPES, default="a2a",
                   help="context-parallel exchange to plan for: all-to-all (heads per TP rank divisible by CP) "
                        "or the ring (any CP)")
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
        estimates = suggest(shape, a.nodes, a.gpus_per_node, a.seq_length, a.gpu_memory_gib, a.reserve,
                            a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.context_parallel_size,
                            cp_comm_type=a.cp_comm_type, **options)
    except (LaunchError, LayoutError, SetupError) as e:
        print(f"plan_parallel.py: error: {e}", file=sys.stderr)
        return 2
    print(describe(shape, a.config, estimates, a.nodes, a.gpus_per_node, a.seq_length, a.gpu_memory_gib, a.reserve,
                   **options))
    if a.simulate:
        shown = estimates[:1 + ALTERNATIVES]
        reports = simulate_estimates(shape, a.config, shown, a.nodes, a.gpus_per_node, a.seq_length,
                                     a.gpu_memory_gib, a.reserve, **options)
        print(describe_simulated(shown, reports))
    return 0
