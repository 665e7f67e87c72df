"""One whole-model training step (forward + backward), stock megatron-core vs MST: peak memory and time.

The model is Llama-3-8B's shape scaled in width: hidden 1024, ffn 3584, SwiGLU, RMSNorm, RoPE, GQA
with 8 query heads and 2 KV groups, vocab 128256, untied; 4 layers by default. Both variants use
megatron's full activation recompute (uniform, one layer per checkpoint), the best memory setting
stock megatron-core offers without Transformer Engine:

* ``stock``: ``GPTModel`` with megatron's ``get_gpt_layer_local_spec()`` (attention through the
  ``[b, heads, s, s]`` scores); the loss from its labels path (full logits, then the vocab-parallel
  cross-entropy).
* ``sdpa``: the same ``GPTModel`` and head with the MST layer spec unchunked: MST's SDPA attention,
  megatron's MLP computation. MST against this one is what the mini-sequences alone do.
* ``mst``: ``MSTGPTModel`` with the MST layer spec and head, chunk counts ``auto`` unless given.

(:func:`benchmarks.common.build_model`.) All three run the same weights (stock's ``state_dict``
loaded with ``strict=True``).

The step is ``model(tokens, positions, None, labels=labels).mean().backward()``. The floor is what any
implementation holds: parameters and their gradients. Peaks come from ``MemTracker`` (via
:func:`mst_megatron.measure.memory.measure_peak`, the allocator's figure alongside); the variants are
built and measured one after the other, so only one model is alive at a time. Times: the median of
``--repeats`` steps after the memory-tracked one. One row per variant in ``results/rows.jsonl``
(benchmark ``model_step``).

    python -m benchmarks.bench_model_step --threads 2           # S = 8192, 4 layers, fp32
    python -m benchmarks.bench_model_step --quick               # tiny, seconds, no rows
"""

import argparse
import statistics
import time
from typing import Dict, List, Optional

import torch

from benchmarks.common import (QUICK_SHAPE, SHAPE, add_model_arguments, build_model, floor_bytes,
                               full_recompute_config, load_average, machine_name, make_row, measure_memory,
                               model_arguments, model_inputs, model_shape, print_table, provenance, rows_path,
                               start_one_rank, write_rows)
from mst_megatron.measure.memory import format_bytes

CATEGORIES = ("PARAM", "GRAD", "ACT", "TEMP", "OTH")
VARIANTS = ("stock", "sdpa", "mst")


def measure(variant: str, args, config, weights: Optional[Dict]) -> Dict:
    model = build_model(variant, config, args.vocab, args.seq, args.mlp_mini_sequences, args.lm_head_mini_sequences)
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    tokens, labels, positions = model_inputs(args.vocab, args.seq)
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


def report_rows(report: Dict, prov: Dict) -> List[Dict]:
    """One ``model_step`` row per variant of a report of :func:`main`."""
    c = report["config"]
    shape = model_shape(c["shape"], c["layers"], c["vocab"], c["seq"])
    name = machine_name(report["machine"], c.get("threads"))
    rows = []
    for variant, v in report["variants"].items():
        metrics = {"peak_bytes": v["peak"]["total"], "above_floor_bytes": v["peak"]["above_floor"],
                   "floor_bytes": v["floor"], "allocator_peak_delta_bytes": v["peak"]["allocator_peak_delta"],
                   "peak_by_category_bytes": {k: v["peak"][k] for k in CATEGORIES},
                   "tracked_step_s": v["tracked_step_s"], "times_s": v["times_s"]}
        if "time_s" in v:
            metrics["time_s"] = v["time_s"]
        rows.append(make_row("model_step", variant, shape, "fp32", name, metrics, prov))
    return rows


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p, seq=8192, vocab=128256, quick_help="tiny sizes (h=128, V=4096, S=512)")
    p.add_argument("--mlp-mini-sequences", default="auto")
    p.add_argument("--lm-head-mini-sequences", default="auto")
    p.add_argument("--repeats", type=int, default=1, help="timed steps after the memory-tracked one")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = model_arguments(p.parse_args(argv), SHAPE, QUICK_SHAPE, quick_vocab=4096, quick_seq=512)
    for name in ("mlp_mini_sequences", "lm_head_mini_sequences"):
        value = getattr(args, name)
        setattr(args, name, value if value == "auto" else int(value))
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    import mst_megatron

    args = parse_args(argv)
    prov = provenance("python -m benchmarks.bench_model_step")  # the code as it is when the run starts
    machine = start_one_rank(args.threads)
    config = full_recompute_config(args.shape, torch.float32, args.layers)
    load_start = load_average()
    report = {"config": {k: v for k, v in vars(args).items() if k != "rows"}, "machine": machine, "variants": {}}
    stock = measure("stock", args, config, None)
    weights = stock.pop("weights")
    report["variants"] = {"stock": stock, **{v: measure(v, args, config, weights) for v in VARIANTS[1:]}}
    del weights
    load_end = load_average()

    table = []
    for name, v in report["variants"].items():
        row = {"variant": name, **{k: format_bytes(v["peak"][k]) for k in (*CATEGORIES, "total")},
               "floor": format_bytes(v["floor"]), "above floor": format_bytes(v["peak"]["above_floor"]),
               "allocator": format_bytes(v["peak"]["allocator_peak_delta"])}
        if "time_s" in v:
            row["step time"] = f"{v['time_s']:.1f} s"
        table.append(row)
    print_table(table, list(table[0]))
    mst = report["variants"]["mst"]
    for base in VARIANTS[:2]:
        b = report["variants"][base]
        print(f"S={args.seq}: MST / {base}: peak {mst['peak']['total'] / b['peak']['total']:.3f}, above floor "
              f"{mst['peak']['above_floor'] / b['peak']['above_floor']:.3f}"
              + (f", time {mst['time_s'] / b['time_s']:.3f}" if "time_s" in mst and "time_s" in b else ""))
    print(f"load average (1, 5, 15 min): start {load_start}, end {load_end}")
    path = rows_path(args)
    if path:
        write_rows(report_rows(report, dict(prov, load_average=load_start, load_average_end=load_end)), path)
    mst_megatron.destroy_parallel()
    return report


if __name__ == "__main__":
    main()
