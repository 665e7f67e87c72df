"""Step time under megatron's full recompute: stock+SDPA against MST, with and without the GEMM-free
layer recompute of the MST MLP, in interleaved rounds on one machine.

Model: :mod:`bench_model_step`'s width-scaled Llama-3 (hidden 1024, ffn 3584, 8 heads, 2 KV groups),
4 layers, vocab 32K by default (so the decoder, not the head, dominates), fp32, b = 1,
``recompute_granularity="full"``, ``uniform``, one layer per checkpoint. Variants, same weights:

* ``sdpa``: megatron's ``GPTModel`` and head with the MST layer spec unchunked (one mini-sequence:
  megatron's MLP computation, the same SDPA attention kernel as MST);
* ``mst``: ``MSTGPTModel``, MST spec and head, chunk counts ``auto`` (the current code);
* ``mst-full-mlp-recompute``: the same with the MLP computing in megatron's layer recompute as it
  did before (``MiniSequenceMLP._in_layer_recompute_ending_checkpoint`` forced False): the baseline.

Each round runs one step of every variant (order rotated per round); the report gives every round's
times, the medians and the ratios. The machine may be shared with other jobs: read the load averages.

    python benchmarks/bench_full_recompute_step.py                  # S = 8192, 3 rounds
    python benchmarks/bench_full_recompute_step.py --quick          # tiny, seconds
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import start_one_rank  # noqa: E402
from bench_lm_head import load_average  # noqa: E402
from bench_mlp import QUICK_SHAPE, SHAPE, make_config  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_full_recompute_step.json")
VARIANTS = ("sdpa", "mst", "mst-full-mlp-recompute")


def build(variant: str, config, vocab: int, seq: int):
    import mst_megatron
    from megatron.core.models.gpt import GPTModel

    common = dict(config=config, vocab_size=vocab, max_sequence_length=seq, position_embedding_type="rope",
                  share_embeddings_and_output_weights=False)
    if variant == "sdpa":
        return GPTModel(transformer_layer_spec=mst_megatron.get_gpt_mst_layer_spec(1), **common)
    model = mst_megatron.MSTGPTModel(transformer_layer_spec=mst_megatron.get_gpt_mst_layer_spec("auto"),
                                     lm_head_mini_sequences="auto", **common)
    if variant == "mst-full-mlp-recompute":
        for module in model.modules():
            if isinstance(module, mst_megatron.MiniSequenceMLP):
                module._in_layer_recompute_ending_checkpoint = lambda: False
    return model


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="h 128, vocab 4096, S 1024")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON report ('' for none)")
    args = p.parse_args(argv)
    args.shape = QUICK_SHAPE if args.quick else SHAPE
    if args.quick:
        args.vocab, args.seq = 4096, 1024
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    import mst_megatron

    args = parse_args(argv)
    machine = start_one_rank(args.threads)
    config = make_config(args.shape, torch.float32, num_layers=args.layers, recompute_granularity="full",
                         recompute_method="uniform", recompute_num_layers=1)
    torch.manual_seed(0)
    models = {v: build(v, config, args.vocab, args.seq) for v in VARIANTS}
    weights = models["sdpa"].state_dict()
    for v in VARIANTS[1:]:
        models[v].load_state_dict(weights, strict=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (1, args.seq), generator=g)
    labels = torch.randint(0, args.vocab, (1, args.seq), generator=g)
    positions = torch.arange(args.seq).unsqueeze(0)

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
        print("round", r, {v: f"{t:.2f} s" for v, t in rounds[-1].items()}, f"load {loads[-1]:.2f}", flush=True)
    medians = {v: statistics.median(r[v] for r in rounds) for v in VARIANTS}
    report = {
        "benchmark": f"step time, {args.layers} layers, full recompute (uniform, 1 layer), b=1, fp32",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine,
        "load_average_1min": loads,
        "rounds_s": rounds,
        "median_s": medians,
        "ratio_sdpa_over": {v: medians["sdpa"] / medians[v] for v in VARIANTS[1:]},
        "ratio_before_over_after": medians["mst-full-mlp-recompute"] / medians["mst"],
    }
    print("medians", {v: f"{t:.2f} s" for v, t in medians.items()})
    print("stock+SDPA / MST time:", {v: f"{x:.3f}" for v, x in report["ratio_sdpa_over"].items()},
          f"; before / after: {report['ratio_before_over_after']:.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    mst_megatron.destroy_parallel()
    return report


if __name__ == "__main__":
    main()
