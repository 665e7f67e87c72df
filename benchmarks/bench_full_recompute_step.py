"""Step time under megatron's full recompute: stock+SDPA against MST, with and without the GEMM-free
layer recompute of the MST MLP, in interleaved rounds on one machine.

Model: :mod:`benchmarks.bench_model_step`'s width-scaled Llama-3 (hidden 1024, ffn 3584, 8 heads, 2 KV groups),
4 layers, vocab 32K by default (so the decoder, not the head, dominates), fp32, b = 1,
``recompute_granularity="full"``, ``uniform``, one layer per checkpoint. Variants, same weights:

* ``sdpa``: megatron's ``GPTModel`` and head with the MST layer spec unchunked (one mini-sequence:
  megatron's MLP computation, the same SDPA attention kernel as MST);
* ``mst``: ``MSTGPTModel``, MST spec and head, chunk counts ``auto`` (the current code);
* ``mst-full-mlp-recompute``: the same with the MLP computing in megatron's layer recompute as it
  did before (``MiniSequenceMLP._in_layer_recompute_ending_checkpoint`` forced False): the baseline.

Each round runs one step of every variant (order rotated per round); the rows (benchmark
``full_recompute_step``, one per variant) keep every round's times and the median. The machine may be
shared with other jobs: read the load averages.

    python -m benchmarks.bench_full_recompute_step --threads 2     # S = 8192, 3 rounds
    python -m benchmarks.bench_full_recompute_step --quick         # tiny, seconds, no rows
"""

import argparse
import statistics
import time
from typing import Dict, List, Optional

import torch

from benchmarks.common import (QUICK_SHAPE, SHAPE, add_model_arguments, build_model, full_recompute_config,
                               load_average, machine_name, make_row, model_arguments, model_inputs, model_shape,
                               provenance, rows_path, start_one_rank, write_rows)

VARIANTS = ("sdpa", "mst", "mst-full-mlp-recompute")


def build(variant: str, config, vocab: int, seq: int):
    """:func:`benchmarks.common.build_model`'s ``sdpa`` or ``mst``, or ``mst-full-mlp-recompute``."""
    import mst_megatron

    model = build_model("sdpa" if variant == "sdpa" else "mst", config, vocab, seq)
    if variant == "mst-full-mlp-recompute":
        for module in model.modules():
            if isinstance(module, mst_megatron.MiniSequenceMLP):
                module._in_layer_recompute_ending_checkpoint = lambda: False
    return model


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p, seq=8192, vocab=32768, quick_help="h 128, vocab 4096, S 1024")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return model_arguments(p.parse_args(argv), SHAPE, QUICK_SHAPE, quick_vocab=4096, quick_seq=1024)


def main(argv: Optional[List[str]] = None) -> Dict:
    import mst_megatron

    args = parse_args(argv)
    prov = provenance("python -m benchmarks.bench_full_recompute_step")  # the code as it is when the run starts
    info = start_one_rank(args.threads)
    config = full_recompute_config(args.shape, torch.float32, args.layers)
    torch.manual_seed(0)
    models = {v: build(v, config, args.vocab, args.seq) for v in VARIANTS}
    weights = models["sdpa"].state_dict()
    for v in VARIANTS[1:]:
        models[v].load_state_dict(weights, strict=True)
    tokens, labels, positions = model_inputs(args.vocab, args.seq)

    def step(model):
        start = time.perf_counter()
        model(tokens, positions, None, labels=labels).mean().backward()
        elapsed = time.perf_counter() - start
        for p in model.parameters():
            p.grad = None
        return elapsed

    for model in models.values():  # warm-up
        step(model)
    loads = [load_average()]
    rounds = []
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        rounds.append({v: step(models[v]) for v in order})
        loads.append(load_average())
        print("round", r, {v: f"{t:.2f} s" for v, t in rounds[-1].items()}, f"load {loads[-1]}", flush=True)
    medians = {v: statistics.median(r[v] for r in rounds) for v in VARIANTS}
    print("medians", {v: f"{t:.2f} s" for v, t in medians.items()})
    print("time / sdpa (stock megatron-core with MST's SDPA attention):",
          {v: f"{medians[v] / medians['sdpa']:.3f}" for v in VARIANTS[1:]},
          f"; before / after: {medians['mst-full-mlp-recompute'] / medians['mst']:.3f}")
    path = rows_path(args)
    if path:
        prov.update(load_average=loads[0], load_averages_per_round=loads)
        shape = model_shape(args.shape, args.layers, args.vocab, args.seq)
        name = machine_name(info, args.threads)
        write_rows([make_row("full_recompute_step", v, shape, "fp32", name,
                             {"time_s": medians[v], "times_s": [r[v] for r in rounds]}, prov) for v in VARIANTS], path)
    mst_megatron.destroy_parallel()
    return {"rounds_s": rounds, "median_s": medians, "load_average_1min": loads}


if __name__ == "__main__":
    main()
