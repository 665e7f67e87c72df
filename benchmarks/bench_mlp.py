"""Memory and time of the mini-sequence MLP against megatron-core's, on a Llama-3-8B-shaped layer
scaled in width (hidden 1024, ffn 3584, SwiGLU, RMSNorm, GQA with 8 query heads and 2 KV groups).

Two measurements per sequence length S (b=1, fp32 by default, single process):

* ``mlp``: one MLP forward + backward, megatron's ``MLP`` ("stock") vs ``MiniSequenceMLP`` ("mst").
* on megatron-core >= 0.19 both parts add "mcore-chunks": megatron's own MLP chunking
  (``TransformerConfig.mlp_chunks_for_training``, applied in ``TransformerLayer``: ``torch.chunk``
  inside the ordinary graph, no per-chunk recompute) with the same count as "mst"; in the ``mlp``
  part it runs in a layer holding only the MLP and its residual add.
* ``layer``: one transformer layer forward + backward under megatron's full recompute
  (``TransformerBlock`` with one layer, ``recompute_granularity="full"``, no RoPE), for the local
  spec ("stock": softmax attention with ``[b, heads, s, s]`` scores), the MST spec with one
  mini-sequence ("mst-M1": SDPA attention, unchunked MLP) and the MST spec ("mst"). mst vs mst-M1
  isolates the MLP chunking; mst vs stock is the whole spec.

Peak bytes come from :func:`mst_megatron.measure.memory.measure_peak`: the breakdown by category at the
peak, plus the allocator's own figure ("alloc": its highest net allocation above the start of the
step, so without the weights and inputs that existed before) as a cross-check. The floor is what any
implementation must hold: weights, their gradients, the input, the upstream gradient, the output and
the input gradient; "above floor" is the peak minus that.

Times, outside the tracker: ``--warmup`` then ``--repeats`` rounds, each round running every variant
once in turn (so load from other processes hits them alike); a variant's time is its median, a time
ratio is the median over rounds of the paired ratio. Wall time and this process's CPU time are both
recorded: on a shared machine the CPU-time ratio is the steadier measure of the work done, and the
load average at start and end says how shared it was. At S >= 32K: ``--long-repeats`` rounds, the
memory run serving as the warm-up.

Rows (``results/rows.jsonl``): benchmark ``mlp`` or ``layer_full_recompute``, one per variant and S;
an MST variant's name carries its chunk count (``mst M=8``).

Examples::

    python -m benchmarks.bench_mlp --threads 2          # S = 2K, 8K, 32K; fp32
    python -m benchmarks.bench_mlp --seq 8192 --parts mlp
    python -m benchmarks.bench_mlp --quick              # tiny sizes, seconds, no rows
"""

import argparse
import statistics
import time

import torch

import mst_megatron
from benchmarks.common import (QUICK_SHAPE, SHAPE, add_rows_argument, load_average, machine, machine_name,
                               make_config, make_row, provenance, rows_path, shape_text, start_one_rank,
                               write_rows)
from mst_megatron.measure.memory import format_bytes, measure_peak

CATEGORIES = ("PARAM", "GRAD", "ACT", "TEMP", "OTH")
LONG = 32768
# The stock layer is skipped when its attention scores and probabilities alone exceed this share of
# the available memory (they are a lower bound of what it needs).
STOCK_LAYER_MEMORY_SHARE = 0.6
BENCHMARKS = {"mlp": "mlp", "layer": "layer_full_recompute"}


def build_mlp(config, mlp_mini_sequences=None):
    """megatron's ``MLP`` when ``mlp_mini_sequences`` is None, else ``MiniSequenceMLP``."""
    from megatron.core.transformer.spec_utils import build_module

    from mst_megatron.specs.gpt_layer_specs import get_mlp_spec

    return build_module(get_mlp_spec(config, mlp_mini_sequences), config=config)


def build_layer(config, mlp_mini_sequences):
    """One-layer block; megatron's local spec when ``mlp_mini_sequences`` is None, else the MST spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlock

    if mlp_mini_sequences is None:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    else:
        spec = mst_megatron.get_gpt_mst_layer_spec(mlp_mini_sequences)
    return TransformerBlock(config, spec, post_layer_norm=False)


def build_mlp_layer(config):
    """A ``TransformerLayer`` holding only megatron's ``MLP`` (and its residual add): the module in
    which megatron applies ``config.mlp_chunks_for_training``."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from mst_megatron.specs.gpt_layer_specs import get_mlp_spec

    spec = ModuleSpec(TransformerLayer, submodules=TransformerLayerSubmodules(
        mlp=get_mlp_spec(config, None), mlp_bda=get_bias_dropout_add))
    return build_module(spec, config=config)


def variants(part, shape, dtype, mst_m, seq):
    """``(config, {variant name: module})`` for one part, all with the same weights. Where this
    megatron-core has ``mlp_chunks_for_training`` (0.19), "mcore-chunks" is megatron's own MLP
    chunking (``torch.chunk`` in ``TransformerLayer``, no per-chunk recompute) with MST's count."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    mcore_chunks = "mlp_chunks_for_training" in TransformerConfig.__dataclass_fields__
    if part == "mlp":
        config = make_config(shape, dtype)
        modules = {"stock": build_mlp(config, None), "mst": build_mlp(config, mst_m)}
        count = modules["mst"].num_chunks(seq)
        if mcore_chunks:
            modules["mcore-chunks"] = build_mlp_layer(make_config(shape, dtype, mlp_chunks_for_training=count))
    else:
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        config = make_config(shape, dtype, **recompute)
        modules = {"stock": build_layer(config, None), "mst-M1": build_layer(config, 1),
                   "mst": build_layer(config, mst_m)}
        count = modules["mst"].layers[0].mlp.num_chunks(seq)
        if mcore_chunks:
            chunked = make_config(shape, dtype, mlp_chunks_for_training=count, **recompute)
            modules["mcore-chunks"] = build_layer(chunked, 1)
    weights = modules["stock"].state_dict()
    for name, module in modules.items():
        if name == "mcore-chunks" and part == "mlp":
            module.mlp.load_state_dict(weights)
        else:
            module.load_state_dict(weights)
    return config, modules, count


def nbytes(t):
    return t.numel() * t.element_size()


class Step:
    """One forward + backward of ``module`` on a fixed input; measures peak memory and time."""

    def __init__(self, module, seq, dtype, hidden, **call_kwargs):
        self.module = module
        self.call_kwargs = call_kwargs
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(seq, 1, hidden, generator=g).to(dtype).requires_grad_()
        self.grad_out = torch.randn(seq, 1, hidden, generator=g).to(dtype)
        self.out_bytes = 0

    def __call__(self):
        out = self.module(self.x, **self.call_kwargs)
        out = out[0] if isinstance(out, tuple) else out  # the MLP returns (output, bias)
        out.backward(self.grad_out)
        self.out_bytes = nbytes(out)

    def reset(self):
        self.module.zero_grad(set_to_none=True)
        self.x.grad = None

    def memory(self):
        self.reset()
        peak = measure_peak(self, (self.module, self.x, self.grad_out), allocator=True)
        weights = sum(nbytes(p) for p in self.module.parameters())
        floor = 2 * weights + 2 * nbytes(self.x) + nbytes(self.grad_out) + self.out_bytes
        self.reset()
        return dict(peak=peak, floor=floor, above_floor=peak["total"] - floor)

    def time_once(self):
        """(wall seconds, CPU seconds of this process)."""
        self.reset()
        wall, cpu = time.perf_counter(), time.process_time()
        self()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.reset()
        return wall, cpu


def stock_layer_skip_reason(config, seq, dtype):
    """Why the stock layer cannot run at this S on this machine, or None."""
    need = 2 * config.num_attention_heads * seq * seq * torch.tensor([], dtype=dtype).element_size()
    with open("/proc/meminfo") as f:
        have = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    if have is None or need <= STOCK_LAYER_MEMORY_SHARE * have:
        return None
    return (f"the local spec's [b, heads, s, s] attention scores and probabilities alone need "
            f"{format_bytes(need)}; {format_bytes(have)} available")


def run(args):
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shape = QUICK_SHAPE if args.quick else SHAPE
    mst_m = args.mini_sequences if args.mini_sequences == "auto" else int(args.mini_sequences)
    torch.manual_seed(0)
    results, skipped = [], []
    loads = {"start": load_average()}  # the machine may be shared: read times with this
    for seq in args.seq or ([256, 1024] if args.quick else [2048, 8192, LONG]):
        for part in args.parts:
            config, modules, count = variants(part, shape, dtype, mst_m, seq)
            steps, rows = {}, {}
            for name, module in modules.items():
                reason = None
                if (part, name) == ("layer", "stock"):
                    reason = stock_layer_skip_reason(config, seq, dtype)
                if reason:
                    print(f"skip layer/stock at S={seq}: {reason}", flush=True)
                    skipped.append(dict(part=part, seq=seq, variant=name, reason=reason))
                    continue
                m = count if name in ("mst", "mcore-chunks") else 1
                layer = part == "layer" or name == "mcore-chunks"
                steps[name] = Step(module, seq, dtype, shape["hidden_size"], **({"attention_mask": None} if layer else {}))
                rows[name] = dict(part=part, seq=seq, variant=name, mini_sequences=m, **steps[name].memory())
                rows[name]["times_s"], rows[name]["cpu_times_s"] = [], []
            # Timed rounds alternate the variants, so load from other processes hits them alike.
            warmup, repeats = (0, args.long_repeats) if seq >= LONG else (args.warmup, args.repeats)
            for i in range(warmup + repeats):
                for name, step in steps.items():
                    wall, cpu = step.time_once()
                    if i >= warmup:
                        rows[name]["times_s"].append(wall)
                        rows[name]["cpu_times_s"].append(cpu)
            for name, row in rows.items():
                row["time_s"] = statistics.median(row["times_s"])
                row["cpu_time_s"] = statistics.median(row["cpu_times_s"])
                results.append(row)
                print(f"{part:5s} S={seq:6d} {name:12s} M={row['mini_sequences']:3d} "
                      f"peak {format_bytes(row['peak']['total']):>11s} "
                      f"above floor {format_bytes(row['above_floor']):>11s} time {row['time_s']:.3f}s",
                      flush=True)
    loads["end"] = load_average()
    settings = dict(dtype=args.dtype, batch=1, shape=shape, quick=args.quick, rope=False,
                    mlp_mini_sequences=args.mini_sequences, warmup=args.warmup, repeats=args.repeats,
                    long_repeats=args.long_repeats, threads=torch.get_num_threads())
    return dict(machine=machine(), settings=settings, load_average=loads, results=results,
                skipped=skipped, ratios=ratios(results))


def ratios(results):
    """MST over stock (and over mst-M1 for the layer) per part and S."""
    index = {(r["part"], r["seq"], r["variant"]): r for r in results}
    out = []
    for (part, seq, variant), r in index.items():
        for base in ("stock", "mst-M1", "mcore-chunks") if variant == "mst" else ():
            b = index.get((part, seq, base))
            if b is None:
                continue
            # times: median over rounds of the paired ratio (same round, same outside load)
            paired = lambda key: statistics.median(t / u for t, u in zip(r[key], b[key]))  # noqa: E731
            out.append(dict(part=part, seq=seq, versus=base, mini_sequences=r["mini_sequences"],
                            above_floor_ratio=r["above_floor"] / b["above_floor"],
                            peak_ratio=r["peak"]["total"] / b["peak"]["total"],
                            time_ratio=paired("times_s"), cpu_time_ratio=paired("cpu_times_s")))
    return out


def report_rows(report, prov):
    """One row per measured variant, part and S of a report of :func:`run`."""
    settings, shape = report["settings"], report["settings"]["shape"]
    name = machine_name(report["machine"], settings["threads"])
    rows = []
    for r in report["results"]:
        variant = r["variant"] if r["variant"] in ("stock", "mst-M1") else f"{r['variant']} M={r['mini_sequences']}"
        text = shape_text(h=shape["hidden_size"], ffn=shape["ffn_hidden_size"],
                          heads=f"{shape['num_attention_heads']}/{shape['num_query_groups']}", S=r["seq"], b=1)
        metrics = {"peak_bytes": r["peak"]["total"], "above_floor_bytes": r["above_floor"], "floor_bytes": r["floor"],
                   "allocator_peak_delta_bytes": r["peak"]["allocator_peak_delta"],
                   "peak_by_category_bytes": {k: r["peak"][k] for k in CATEGORIES},
                   **{k: r[k] for k in ("time_s", "cpu_time_s", "times_s", "cpu_times_s")}}
        rows.append(make_row(BENCHMARKS[r["part"]], variant, text, settings["dtype"], name, metrics, prov))
    return rows


def print_table(report):
    mib = lambda n: f"{n / 2**20:9.1f}"  # noqa: E731
    settings = report["settings"]
    print(f"\n{report['machine']['cpu']}, {settings['threads']} threads, {settings['dtype']}, b=1; "
          "MiB at the peak, by category")
    print(f"{'part':5s} {'S':>6s} {'variant':12s} {'M':>3s} " + " ".join(f"{c:>9s}" for c in CATEGORIES)
          + f" {'total':>9s} {'floor':>9s} {'>floor':>9s} {'alloc':>9s} {'time s':>8s} {'cpu s':>8s}")
    for r in report["results"]:
        p = r["peak"]
        print(f"{r['part']:5s} {r['seq']:6d} {r['variant']:12s} {r['mini_sequences']:3d} "
              + " ".join(mib(p[c]) for c in CATEGORIES)
              + f" {mib(p['total'])} {mib(r['floor'])} {mib(r['above_floor'])}"
              + f" {mib(p['allocator_peak_delta'])} {r['time_s']:8.3f} {r['cpu_time_s']:8.3f}")
    print(f"\n{'part':5s} {'S':>6s} {'MST vs':12s} {'M':>3s} {'>floor ratio':>12s} {'peak ratio':>10s} "
          f"{'time MST/base':>13s} {'speed base/MST':>14s} {'cpu MST/base':>12s}")
    for q in report["ratios"]:
        print(f"{q['part']:5s} {q['seq']:6d} {q['versus']:12s} {q['mini_sequences']:3d} "
              f"{q['above_floor_ratio']:12.3f} {q['peak_ratio']:10.3f} {q['time_ratio']:13.3f} "
              f"{1 / q['time_ratio']:14.3f} {q['cpu_time_ratio']:12.3f}")
    load = report["load_average"]
    print(f"load average (1, 5, 15 min) at start {load['start']}, at end {load['end']}")
    for s in report["skipped"]:
        print(f"skipped {s['part']}/{s['variant']} at S={s['seq']}: {s['reason']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", help="sequence lengths (default 2048 8192 32768)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and sequences, for a smoke run")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--parts", nargs="+", choices=("mlp", "layer"), default=["mlp", "layer"])
    parser.add_argument("--mini-sequences", default="auto", help="MST chunk count: an int or 'auto'")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-repeats", type=int, default=1, help="timed runs at S >= 32K")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    add_rows_argument(parser)
    args = parser.parse_args(argv)
    prov = provenance("python -m benchmarks.bench_mlp")  # the code as it is when the run starts
    start_one_rank(args.threads)
    report = run(args)
    print_table(report)
    path = rows_path(args)
    if path:
        prov.update(load_average=report["load_average"]["start"], load_average_end=report["load_average"]["end"],
                    skipped=report["skipped"])
        write_rows(report_rows(report, prov), path)
    mst_megatron.destroy_parallel()


if __name__ == "__main__":
    main()
