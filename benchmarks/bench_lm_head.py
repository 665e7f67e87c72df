"""LM head + cross-entropy, forward + backward: peak memory and time, stock megatron vs MST.

Stock is what ``GPTModel`` does with labels: megatron's ``ColumnParallelLinear`` output layer gives
the ``[s, b, V]`` logits, then ``compute_language_model_loss`` (the vocab-parallel cross-entropy,
with labels transposed to ``[s, b]``). MST is the same layer object promoted to
:class:`mst_megatron.modules.lm_head.MiniSequenceLMHead` and given the labels: one chunk of logits at
a time, its gradients formed in forward (stock's 3 GEMMs of ``T x h x V``; the mean loss here leaves
nothing to recompute in backward).

Peak memory comes from :func:`mst_megatron.measure.memory.measure_peak` (``MemTracker``; the CPU
allocator's figure is reported too). The *floor* is what any implementation must hold: the head
weight and its gradient, the hidden state and its gradient. Times are medians of interleaved runs
after warm-up. A case whose estimated peak does not fit in the memory available now (with a margin)
is reported as not measured, with its estimate, instead of risking the machine.

    python -m benchmarks.bench_lm_head --threads 2        # S = 2K, 8K, 32K at V=128256, h=1024, fp32
    python -m benchmarks.bench_lm_head --quick            # tiny sizes, seconds, no rows
    python -m benchmarks.bench_lm_head --bf16 --seq-lengths 8192
    python -m benchmarks.bench_lm_head --chunk-gemms 256 373 --threads 2   # one chunk's GEMMs, GFLOP/s

Rows (``results/rows.jsonl``): benchmark ``lm_head`` (a variant per implementation and S; an MST
variant's name carries its chunk count, ``mst M=32``; a case not run for memory has
``measured: false`` and its estimate) or ``lm_head_chunk_gemms`` (a variant per vocab block count).
"""

import argparse
import statistics
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.common import (add_rows_argument, clear_grads, floor_bytes, interleaved_times, load_average,
                               machine_name, make_row, measure_memory, print_table,
                               provenance, rows_path, shape_text, start_one_rank, write_rows)
from mst_megatron.measure.memory import format_bytes, mem_available_bytes

CATEGORIES = ("PARAM", "GRAD", "ACT", "TEMP", "OTH")


# ---------------------------------------------------------------- the LM head case


def build_head(hidden_size: int, vocab_size: int, dtype: torch.dtype):
    """megatron's output layer as GPTModel builds it, promoted to the MST head (one weight for all)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from mst_megatron.modules.lm_head import MiniSequenceLMHead
    from mst_megatron.specs.llama_config import llama_transformer_config

    config = llama_transformer_config(
        num_layers=1, hidden_size=hidden_size, num_attention_heads=1, params_dtype=dtype,
        use_cpu_initialization=True, perform_initialization=False,
    )
    head = ColumnParallelLinear(
        hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False
    )
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02)
    return MiniSequenceLMHead.adopt(head)


def stock_step(head, hidden: torch.Tensor, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Forward + backward of the mean per-token loss as GPTModel computes it: logits, then the
    vocab-parallel cross-entropy (``compute_language_model_loss`` without fusion); returns the
    per-token loss."""
    from megatron.core import tensor_parallel

    def step():
        logits, _ = head(hidden)  # the stock ColumnParallelLinear forward
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()
        loss.mean().backward()
        return loss.detach()

    return step


def mst_step(head, hidden: torch.Tensor, labels: torch.Tensor, mini_sequences) -> Callable[[], torch.Tensor]:
    """The same loss through the MST head with ``mini_sequences`` chunks."""

    def step():
        head.mini_sequences = mini_sequences
        loss, _ = head(hidden, labels=labels)
        loss.mean().backward()
        return loss.detach()

    return step


def estimated_peak(num_chunks: Optional[int], tokens: int, vocab: int, hidden: int, dtype: torch.dtype,
                   floor: int) -> int:
    """A generous estimate of a step's peak (stock when ``num_chunks`` is None), to decide whether
    it is safe to run."""
    if num_chunks is None:
        # logits; for 16-bit also the fp32 copy (softmax, then its gradient) and the 16-bit gradient
        per_logit = 4 if dtype == torch.float32 else 2 + 4 + 2
        return floor + per_logit * tokens * vocab
    # an fp32 chunk of logits (its gradient in place, plus a 16-bit copy) and, twice over, a chunk of
    # the backward's correction; for 16-bit weights the fp32 weight-gradient sum
    rows = -(-tokens // num_chunks)
    fp32_dw = 0 if dtype == torch.float32 else 4 * vocab * hidden
    return floor + 3 * 4 * rows * vocab + fp32_dw


def run_seq_length(args, seq: int) -> Dict:
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    head = build_head(args.hidden, args.vocab, dtype)
    g = torch.Generator().manual_seed(seq)
    hidden = torch.randn(seq, args.batch, args.hidden, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.batch, seq), generator=g)
    tokens = seq * args.batch
    floor = floor_bytes([head.weight, hidden])
    externals = [head.weight, hidden, labels]

    variants = {"stock": (None, None, stock_step(head, hidden, labels))}
    for m in args.mini_sequences:
        head.mini_sequences = m
        variants[f"mst M={m}"] = (m, head.num_chunks(tokens), mst_step(head, hidden, labels, m))

    result = {
        "seq_length": seq, "tokens": tokens, "floor_bytes": floor, "fp32_logits_bytes": tokens * args.vocab * 4,
        "load_average_start": load_average(), "variants": {},
    }
    runnable = {}
    for name, (mini_sequences, num_chunks, step) in variants.items():
        estimate = estimated_peak(num_chunks, tokens, args.vocab, args.hidden, dtype, floor)
        entry = {"mini_sequences": mini_sequences, "chunks": num_chunks, "estimated_peak_bytes": estimate}
        available = mem_available_bytes()
        if estimate * args.memory_margin > available:
            entry.update(measured=False, available_bytes=available,
                         reason=f"estimated peak {format_bytes(estimate)} x margin {args.memory_margin} > "
                                f"available {format_bytes(available)}")
        else:
            # The first run of each step is this memory-tracked one: it is also the warm-up.
            entry.update(measured=True, peak=measure_memory(step, externals, floor))
            runnable[name] = step
        result["variants"][name] = entry

    if seq <= args.time_max_seq and runnable:
        times = interleaved_times(runnable, args.warmup, args.repeats, after_each=lambda: clear_grads(externals))
        for name, ts in times.items():
            result["variants"][name].update(time_s=statistics.median(ts), times_s=ts)

    add_ratios(result)
    result["load_average_end"] = load_average()
    return result


def chunk_gemm_rates(rows: int, vocab: int, hidden: int, rounds: int) -> Dict:
    """GFLOP/s of one chunk's three GEMMs as the op runs them (its ``_ChunkGemms``), with the whole
    vocab shard as one block against the op's choice for this machine (:func:`vocab_blocks`):
    medians of ``rounds`` interleaved rounds after one warm-up round, fp32."""
    from mst_megatron.ops.linear_cross_entropy import _ChunkGemms, vocab_blocks

    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(vocab, hidden, generator=g) * 0.02
    hidden_c = torch.randn(rows, hidden, generator=g)
    dw = torch.zeros(vocab, hidden)
    steps = {}
    for blocks in sorted({1, vocab_blocks(weight)}):
        gemms = _ChunkGemms(rows, weight, blocks)
        logits = gemms.logits(hidden_c)
        steps[(blocks, "logits")] = lambda gemms=gemms: gemms.logits(hidden_c)
        steps[(blocks, "hidden_grad")] = lambda gemms=gemms, logits=logits: gemms.hidden_grad(logits)
        steps[(blocks, "weight_grad")] = lambda gemms=gemms, logits=logits: gemms.add_weight_grad(dw, logits, hidden_c)
    times = interleaved_times(steps, warmup=1, repeats=rounds)
    gflop = 2 * rows * hidden * vocab / 1e9
    result = {"rows": rows, "rounds": rounds, "blocks": {}}
    for (blocks, gemm), ts in times.items():
        entry = result["blocks"].setdefault(str(blocks), {"gflop_per_s": {}, "chunk_s": 0.0})
        entry["gflop_per_s"][gemm] = gflop / statistics.median(ts)
        entry["chunk_s"] += statistics.median(ts)
    return result


def print_chunk_gemm_rates(rates: Dict) -> None:
    one = rates["blocks"]["1"]["chunk_s"]
    for blocks, entry in rates["blocks"].items():
        speeds = ", ".join(f"{k} {v:.0f}" for k, v in entry["gflop_per_s"].items())
        print(f"{rates['rows']} rows, {blocks} vocab block(s): {speeds} GFLOP/s; the chunk's GEMMs "
              f"{entry['chunk_s']:.2f} s ({one / entry['chunk_s']:.3f}x one block's speed)")


def add_ratios(result: Dict) -> None:
    """Each MST variant against stock: above-floor peak ratio; time ratio MST/stock of the medians,
    and the median of the per-round ratios (rounds are interleaved, so this one cancels load drift)."""
    stock = result["variants"]["stock"]
    for name, v in result["variants"].items():
        if name == "stock" or not (v["measured"] and stock["measured"]):
            continue
        v["above_floor_ratio"] = v["peak"]["above_floor"] / stock["peak"]["above_floor"]
        if "time_s" in v and "time_s" in stock:
            v["time_ratio_mst_over_stock"] = v["time_s"] / stock["time_s"]
            v["time_ratio_paired_median"] = statistics.median(
                m / s for m, s in zip(v["times_s"], stock["times_s"])
            )


def table_rows(results: List[Dict]) -> List[Dict]:
    rows = []
    for r in results:
        for name, v in r["variants"].items():
            row = {"S": r["seq_length"], "impl": name, "chunks": v["chunks"] or "-",
                   "floor": format_bytes(r["floor_bytes"])}
            if not v["measured"]:
                row["total"] = f"not measured (est. {format_bytes(v['estimated_peak_bytes'])})"
            else:
                p = v["peak"]
                row.update({k: format_bytes(p[k]) for k in ("PARAM", "GRAD", "ACT", "TEMP", "OTH", "total")})
                row["above floor"] = format_bytes(p["above_floor"])
                row["allocator"] = format_bytes(p["allocator_peak_delta"])
            if "time_s" in v:
                row["time"] = f"{v['time_s']:.2f} s"
            if "above_floor_ratio" in v:
                row["above-floor ratio"] = f"{v['above_floor_ratio']:.4f}"
            if "time_ratio_mst_over_stock" in v:
                row["time ratio"] = f"{v['time_ratio_mst_over_stock']:.3f}"
                row["paired"] = f"{v['time_ratio_paired_median']:.3f}"
            rows.append(row)
    return rows


def report_rows(report: Dict, prov: Dict) -> List[Dict]:
    """The rows of a report of :func:`main` (its ``results`` or its ``chunk_gemms``)."""
    c = report["config"]
    name = machine_name(report["machine"], c["threads"])
    rows = []
    for r in report["results"]:
        shape = shape_text(h=c["hidden"], V=c["vocab"], S=r["seq_length"], b=c["batch"])
        for variant, v in r["variants"].items():
            metrics = {"measured": v["measured"], "floor_bytes": r["floor_bytes"],
                       "estimated_peak_bytes": v["estimated_peak_bytes"]}
            if v["measured"]:
                p = v["peak"]
                metrics.update(peak_bytes=p["total"], above_floor_bytes=p["above_floor"],
                               allocator_peak_delta_bytes=p["allocator_peak_delta"],
                               peak_by_category_bytes={k: p[k] for k in CATEGORIES})
            else:
                metrics.update(reason=v["reason"])
            metrics.update({k: v[k] for k in ("time_s", "times_s") if k in v})
            label = "stock" if v["chunks"] is None else f"mst M={v['chunks']}"
            rows.append(make_row("lm_head", label, shape, report["dtype"], name, metrics,
                                 dict(prov, load_average=r["load_average_start"],
                                      load_average_end=r["load_average_end"])))
    for r in report.get("chunk_gemms", []):
        shape = shape_text(rows=r["rows"], h=c["hidden"], V=c["vocab"])
        for blocks, entry in r["blocks"].items():
            variant = f"{blocks} vocab block{'s' * (blocks != '1')}"
            rows.append(make_row("lm_head_chunk_gemms", variant, shape, "fp32", name, dict(entry, rounds=r["rounds"]),
                                 prov))
    return rows


COLUMNS = ["S", "impl", "chunks", "PARAM", "GRAD", "ACT", "TEMP", "OTH", "total", "floor", "above floor",
           "allocator", "time", "above-floor ratio", "time ratio", "paired"]


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="bf16 weight and hidden state (default fp32)")
    p.add_argument("--mini-sequences", nargs="+", default=["auto"],
                   help="MST chunk counts to compare, each an int or 'auto' (chunks of about h tokens)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed rounds besides the memory-tracked run, which is every step's first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-max-seq", type=int, default=8192, help="time only sequences up to this length")
    p.add_argument("--memory-margin", type=float, default=1.5,
                   help="run a case only if estimated peak x this <= MemAvailable")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--chunk-gemms", type=int, nargs="+", default=[], metavar="ROWS",
                   help="only time one chunk's GEMMs of ROWS tokens, one vocab block against the op's choice")
    p.add_argument("--gemm-rounds", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny sizes (V=4096, h=64, S=256, 1024)")
    add_rows_argument(p)
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.hidden, args.seq_lengths = 4096, 64, [256, 1024]
    args.mini_sequences = [m if m == "auto" else int(m) for m in args.mini_sequences]
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    import mst_megatron

    prov = provenance("python -m benchmarks.bench_lm_head")  # the code as it is when the run starts
    machine = start_one_rank(args.threads)
    report = {
        "benchmark": "LM head + cross-entropy forward+backward, b=1, TP=1",
        "config": {k: v for k, v in vars(args).items() if k != "rows"},
        "dtype": "bf16" if args.bf16 else "fp32",
        "machine": machine,
        "results": [],
    }
    path = rows_path(args)

    def save():  # after every measurement: long runs keep what they have measured
        if path:
            write_rows(report_rows(report, prov), path)

    if args.chunk_gemms:
        report["benchmark"] = "one chunk's three LM head GEMMs, fp32"
        report["chunk_gemms"] = []
        for rows in args.chunk_gemms:
            report["chunk_gemms"].append(chunk_gemm_rates(rows, args.vocab, args.hidden, args.gemm_rounds))
            print_chunk_gemm_rates(report["chunk_gemms"][-1])
            save()
    else:
        for seq in args.seq_lengths:
            report["results"].append(run_seq_length(args, seq))
            print_table(table_rows(report["results"][-1:]), COLUMNS)
            save()
        print_table(table_rows(report["results"]), COLUMNS)
    mst_megatron.destroy_parallel()
    return report


if __name__ == "__main__":
    main()
