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

    python benchmarks/bench_lm_head.py                  # S = 2K, 8K, 32K at V=128256, h=1024, fp32
    python benchmarks/bench_lm_head.py --quick          # tiny sizes, seconds
    python benchmarks/bench_lm_head.py --bf16 --seq-lengths 8192
    python benchmarks/bench_lm_head.py --chunk-gemms 256 373 --threads 2   # one chunk's GEMMs, GFLOP/s

``results/bench_lm_head_8k_blocked.json`` is the current op at S = 8K with ``--threads 2`` and
``--repeats 5`` on a quiet machine; ``results/bench_lm_head_2k_32k_blocked.json`` the same op at 2K
(timed) and 32K (memory only). Earlier designs, kept for comparison: ``results/bench_lm_head_8k_fused*.json``
(the same GEMMs before the reused logits buffer and the per-thread vocab blocks),
``results/bench_lm_head.json`` (S = 2K, 8K, 32K, ``--threads 1``, a shared machine) recomputed the
logits in backward with whole-vocabulary chunks, ``results/bench_lm_head_8k_tiled*.json``
(``--threads 2``, quiet) in 8192-column vocabulary tiles.

The helpers (``floor_bytes``, ``measure_memory``, ``interleaved_times``, ``mem_available_bytes``,
``add_ratios``, ``print_table``) take any step function, so whole-model comparisons can reuse them.
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import start_one_rank  # noqa: E402
from mst_megatron.measure.memory import format_bytes, measure_peak  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_lm_head.json")


# ---------------------------------------------------------------- reusable measurement helpers


def mem_available_bytes() -> int:
    """The kernel's estimate of memory available to a new allocation (``MemAvailable``), in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def floor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` plus one gradient of the same size each: what any implementation holds."""
    return 2 * sum(t.numel() * t.element_size() for t in tensors)


def clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def measure_memory(step: Callable[[], None], externals: List[torch.Tensor], floor: int) -> Dict[str, int]:
    """Peak of one ``step()`` by category (``measure_peak``, allocator figure included), plus its
    ``above_floor``; gradients of ``externals`` are cleared afterwards."""
    peak = measure_peak(step, externals, allocator=True)
    clear_grads(externals)
    peak["above_floor"] = peak["total"] - floor
    return peak


def wall_seconds(step: Callable[[], None]) -> float:
    """Wall-clock seconds of one ``step()`` (CPU: the work is done when it returns)."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def interleaved_times(steps: Dict[str, Callable[[], None]], warmup: int, repeats: int,
                      after_each: Callable[[], None] = lambda: None,
                      seconds: Callable[[Callable[[], None]], float] = wall_seconds) -> Dict[str, List[float]]:
    """Seconds per call of each step: ``warmup`` unrecorded rounds, then ``repeats`` recorded ones.

    The steps are interleaved within each round, so drifting load on a shared machine hits all alike.
    """
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            elapsed = seconds(step)
            after_each()
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def print_table(rows: List[Dict], columns: List[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


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


def load_average() -> float:
    """1-minute load average: how busy the (shared) machine was."""
    return os.getloadavg()[0]


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
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.hidden, args.seq_lengths = 4096, 64, [256, 1024]
    if args.chunk_gemms and args.out == DEFAULT_OUT:
        args.out = DEFAULT_OUT.replace(".json", "_chunk_gemms.json")
    args.mini_sequences = [m if m == "auto" else int(m) for m in args.mini_sequences]
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    import mst_megatron

    machine = start_one_rank(args.threads)
    report = {
        "benchmark": "LM head + cross-entropy forward+backward, b=1, TP=1",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "dtype": "bf16" if args.bf16 else "fp32",
        "machine": machine,
        "results": [],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():  # after every measurement: long runs keep what they have measured
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

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
    print(f"wrote {args.out}")
    mst_megatron.destroy_parallel()
    return report


if __name__ == "__main__":
    main()
