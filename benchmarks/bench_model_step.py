"""One whole-model training step (forward + backward), stock megatron-core vs MST: peak memory and time.

The model is Llama-3-8B's shape scaled in width: hidden 1024, ffn 3584, SwiGLU, RMSNorm, RoPE, GQA
with 8 query heads and 2 KV groups, vocab 128256, untied; 4 layers by default. Both variants use
megatron's full activation recompute (uniform, one layer per checkpoint), the best memory setting
stock megatron-core offers without Transformer Engine:

* ``stock``: ``GPTModel`` with megatron's ``get_gpt_layer_local_spec()``; the loss from its labels path
  (full logits, then the vocab-parallel cross-entropy).
* ``sdpa``: megatron's ``GPTModel`` and LM head with the MST layer spec unchunked (``get_gpt_mst_layer_spec(1)``:
  the same SDPA attention as MST, megatron's MLP computation): stock megatron-core with MST's attention
  kernel, the baseline that isolates what the mini-sequences do.
* ``mst``: ``MSTGPTModel`` with the MST layer spec (SDPA attention, mini-sequence MLP) and the
  mini-sequence LM head, chunk counts ``auto`` unless given; same weights (stock ``state_dict``
  loaded with ``strict=True``).

The step is ``model(tokens, positions, None, labels=labels).mean().backward()``. The floor is what any
implementation holds: parameters and their gradients. Peaks come from ``MemTracker`` (via
:func:`mst_megatron.measure.memory.measure_peak`, the allocator's figure alongside); the variants are
built and measured one after the other, so only one model is alive at a time. Times: the median of
``--repeats`` steps after the memory-tracked one.

    python benchmarks/bench_model_step.py                       # S = 8192, 4 layers, fp32
    python benchmarks/bench_model_step.py --quick               # tiny, seconds
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
from bench_lm_head import floor_bytes, load_average, measure_memory, print_table  # noqa: E402
from bench_mlp import SHAPE, make_config  # noqa: E402
from mst_megatron.measure.memory import format_bytes  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_model_step.json")
CATEGORIES = ("PARAM", "GRAD", "ACT", "TEMP", "OTH")


def build(variant: str, config, vocab: int, seq: int, mini_sequences):
    """``stock`` (megatron's local spec and head), ``sdpa`` (megatron's ``GPTModel`` and head with the
    MST layer spec unchunked: SDPA attention, one mini-sequence in the MLP) or ``mst`` (MST layer
    spec and head, ``mini_sequences = (mlp, head)``)."""
    import mst_megatron
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    common = dict(config=config, vocab_size=vocab, max_sequence_length=seq, position_embedding_type="rope",
                  share_embeddings_and_output_weights=False)
    if variant == "stock":
        return GPTModel(transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"), **common)
    if variant == "sdpa":
        return GPTModel(transformer_layer_spec=mst_megatron.get_gpt_mst_layer_spec(1), **common)
    mlp_m, head_m = mini_sequences
    return mst_megatron.MSTGPTModel(transformer_layer_spec=mst_megatron.get_gpt_mst_layer_spec(mlp_m),
                                    lm_head_mini_sequences=head_m, **common)


def measure(variant: str, args, config, weights: Optional[Dict]) -> Dict:
    model = build(variant, config, args.vocab, args.seq, (args.mlp_mini_sequences, args.lm_head_mini_sequences))
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (1, args.seq), generator=g)
    labels = torch.randint(0, args.vocab, (1, args.seq), generator=g)
    positions = torch.arange(args.seq).unsqueeze(0)
    params = list(model.parameters())

    def step():
        model(tokens, positions, None, labels=labels).mean().backward()

    def clear():
        for p in params:
            p.grad = None

    floor = floor_bytes(params)
    start = time.perf_counter()
    peak = measure_memory(step, [model, tokens, labels, positions], floor)
    tracked_s = time.perf_counter() - start
    clear()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        clear()
    result = {"floor": floor, "peak": peak, "tracked_step_s": tracked_s, "times_s": times}
    if times:
        result["time_s"] = statistics.median(times)
    if variant == "stock":
        result["weights"] = {k: v for k, v in model.state_dict().items()}
    return result


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--mlp-mini-sequences", default="auto")
    p.add_argument("--lm-head-mini-sequences", default="auto")
    p.add_argument("--repeats", type=int, default=1, help="timed steps after the memory-tracked one")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (h=128, V=4096, S=512)")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    for name in ("mlp_mini_sequences", "lm_head_mini_sequences"):
        value = getattr(args, name)
        setattr(args, name, value if value == "auto" else int(value))
    args.shape = dict(SHAPE)
    if args.quick:
        args.shape.update(hidden_size=128, ffn_hidden_size=448)
        args.vocab, args.seq = 4096, 512
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    import mst_megatron

    machine = start_one_rank(args.threads)
    config = make_config(args.shape, torch.float32, num_layers=args.layers, recompute_granularity="full",
                         recompute_method="uniform", recompute_num_layers=1)
    report = {
        "benchmark": f"whole-model step (forward + backward), {args.layers} layers, full recompute, b=1, fp32",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine,
        "load_average_start": load_average(),
        "variants": {},
    }
    stock = measure("stock", args, config, None)
    weights = stock.pop("weights")
    report["variants"] = {"stock": stock, **{v: measure(v, args, config, weights) for v in ("sdpa", "mst")}}
    del weights
    report["load_average_end"] = load_average()
    mst = report["variants"]["mst"]
    for base in ("stock", "sdpa"):
        b = report["variants"][base]
        report[f"peak_ratio_mst_over_{base}"] = mst["peak"]["total"] / b["peak"]["total"]
        report[f"above_floor_ratio_mst_over_{base}"] = mst["peak"]["above_floor"] / b["peak"]["above_floor"]
        if "time_s" in mst and "time_s" in b:
            report[f"time_ratio_mst_over_{base}"] = mst["time_s"] / b["time_s"]

    rows = []
    for name, v in report["variants"].items():
        row = {"impl": name, **{k: format_bytes(v["peak"][k]) for k in (*CATEGORIES, "total")},
               "floor": format_bytes(v["floor"]), "above floor": format_bytes(v["peak"]["above_floor"]),
               "allocator": format_bytes(v["peak"]["allocator_peak_delta"])}
        if "time_s" in v:
            row["step time"] = f"{v['time_s']:.1f} s"
        rows.append(row)
    print_table(rows, list(rows[0]))
    for base in ("stock", "sdpa"):
        print(f"S={args.seq}: MST / {base}: peak {report[f'peak_ratio_mst_over_{base}']:.3f}, above floor "
              f"{report[f'above_floor_ratio_mst_over_{base}']:.3f}"
              + (f", time {report[f'time_ratio_mst_over_{base}']:.3f}"
                 if f"time_ratio_mst_over_{base}" in report else ""))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    mst_megatron.destroy_parallel()
    return report


if __name__ == "__main__":
    main()
