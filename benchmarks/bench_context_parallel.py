"""Context parallelism: per-rank memory of a full MST training step at world sizes 1 to 8, and the
longest sequence that fits a fixed per-rank memory budget for each.

Model: the whole MST model (MST block spec in an ``MSTGPTModel``: SDPA attention, mini-sequence MLP
and LM head, all "auto" chunk counts), Llama-shaped and small (2 layers, hidden 128, SwiGLU ffn 352,
8 heads, 4 K/V groups, vocab 2048: small weights, so that activations dominate at CPU-sized
sequences), fp32, megatron's full recompute (uniform, 1 layer), b=1. One
training step = megatron's schedule (forward + backward, the batch sharded per CP rank by
``get_batch_on_this_cp_rank``) + DDP gradient reduction + Adam step, after one warm-up step (so
Adam's state exists before the measured step, as in any step but the first).

Layouts (tensor x context parallel with megatron's ``cp_comm_type``, one gloo rank per GPU stand-in):
1; the all-to-all (``a2a``) at CP 2, 4 and 8; the ring (``p2p``) at CP 2, 4 and 8; ``a2a+p2p`` at CP 4 =
2 x 2 (all-to-all inside pairs, ring across them); TP=2 and TP=2 x CP=2 (``a2a``), TP always with
sequence parallelism. Each rank measures its own step with
:func:`mst_megatron.measure.memory.measure_peak` (MemTracker); the table shows the largest rank.

* ``peak``: the whole per-rank peak (weights, DDP gradient buffers, Adam state, activations).
* ``fixed`` and ``act``: the peak is linear in S here (flash attention, chunked MLP and head), so the
  line through the peaks at ``--seq / 2`` and ``--seq`` splits it into a part that does not grow
  with the sequence (``fixed``, its S -> 0 intercept: weights, gradient buffers, Adam state, and the
  weight-gradient temporaries of the embedding and head, one MLP chunk's working set) and the
  activation memory ``act = peak - fixed`` (activations, recomputed activations, activation
  gradients). The line holds where both peaks are the backward's: a rank needs a few MLP chunks
  (``auto``: about ``hidden_size`` tokens each) at ``--seq / 2``, hence the default 4096. Target: ``act`` within 15% of
  ``1/(TP x CP)`` of the single rank's at the same global sequence, and at CP 8 a longest S at least
  7 times the single rank's. The JSON also keeps MemTracker's
  breakdown by category at each peak.
* ``longest S``: the longest global sequence whose per-rank peak fits the budget (default: the single
  rank's peak at ``--seq``, so the single rank's longest is about ``--seq``), measured to within 2%:
  predicted from the line, then narrowed between the longest length measured to fit and the
  shortest measured not to (the JSON keeps both).

Rows (``results/rows.jsonl``): benchmark ``context_parallel_step``, one per layout (the largest
rank's figures); ``benchmarks/tables.py`` draws the curve (longest S against GPU count) from them.

Examples::

    nice -n 19 python -m benchmarks.bench_context_parallel                       # S = 4096
    python -m benchmarks.bench_context_parallel --seq 512 --rows /tmp/rows.jsonl  # a quick smoke run
    python -m benchmarks.bench_context_parallel --seq 512 --layouts 1 "CP=8 p2p" --rows /tmp/rows.jsonl
"""

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from benchmarks.common import (add_rows_argument, load_average, machine, machine_name, make_row, provenance,
                               rows_path, shape_text, write_rows)
from mst_megatron.measure.memory import measure_peak
from tests.helpers.multirank import run_on_ranks

SHAPE = dict(num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=8, num_query_groups=4)
VOCAB = 2048


@dataclass(frozen=True)
class Layout:
    """A measured layout: TP (with SP when > 1) x CP, CP's exchange and ``a2a+p2p``'s [a2a, ring] sizes."""

    tp: int = 1
    cp: int = 1
    cp_comm_type: str = "a2a"
    hierarchical: Optional[Tuple[int, int]] = None

    @property
    def world(self) -> int:
        return self.tp * self.cp

    @property
    def granularity(self) -> int:
        """What every global length must divide by: megatron's CP layout, then SP's split of each shard."""
        return 2 * self.cp * self.tp


# TP=2 alone separates what TP + SP contribute from what CP does; the single rank ("1") comes first
# (it sets the budget). The ring needs no head split; the 8 heads also serve a2a up to CP 8, which
# separates what the exchange costs at CP 8 from what the rest of the step does.
LAYOUTS = {
    "1": Layout(),
    "CP=2 a2a": Layout(cp=2), "CP=2 p2p": Layout(cp=2, cp_comm_type="p2p"), "TP=2": Layout(tp=2),
    "CP=4 a2a": Layout(cp=4), "CP=4 p2p": Layout(cp=4, cp_comm_type="p2p"),
    "CP=4 a2a+p2p 2x2": Layout(cp=4, cp_comm_type="a2a+p2p", hierarchical=(2, 2)),
    "TP=2 x CP=2 a2a": Layout(tp=2, cp=2), "CP=8 a2a": Layout(cp=8),
    "CP=8 p2p": Layout(cp=8, cp_comm_type="p2p"),
}
TARGET_SLACK = 0.15  # per-rank activations within 15% of 1/(TP x CP) of the single rank's
REACH_TARGET = (8, 7.0)  # at a world of 8, the longest S at least 7x the single rank's


class Trainer:
    """This rank's MST model in DDP with megatron's Adam, one training step per call."""

    def __init__(self, layout: Layout, max_seq: int):
        import mst_megatron
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from tests.helpers.models import mst_full_gpt, tiny_config
        from tests.helpers.training import wrap_ddp

        hierarchical = None if layout.hierarchical is None else list(layout.hierarchical)
        mst_megatron.init_parallel(tensor_model_parallel_size=layout.tp, context_parallel_size=layout.cp,
                                   hierarchical_context_parallel_sizes=hierarchical)
        config = tiny_config(**SHAPE, sequence_parallel=layout.tp > 1, recompute_granularity="full",
                             recompute_method="uniform", recompute_num_layers=1, cp_comm_type=layout.cp_comm_type,
                             hierarchical_context_parallel_sizes=hierarchical)
        (self.model,) = wrap_ddp([mst_full_gpt(config, vocab_size=VOCAB, seq_length=max_seq)], config)
        self.optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4), [self.model])
        self.forward_backward = get_forward_backward_func()
        self.granularity = layout.granularity

    def step(self, seq: int) -> None:
        from mst_megatron.training.pretrain import forward_step

        tokens = torch.randint(0, VOCAB, (1, seq + 1), generator=torch.Generator().manual_seed(seq))
        batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(1, seq),
                     position_ids=torch.arange(seq).unsqueeze(0))
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.forward_backward(forward_step_func=forward_step, data_iterator=iter([batch]), model=self.model,
                              num_microbatches=1, seq_length=seq, micro_batch_size=1)
        self.optimizer.step()

    def peak(self, seq: int) -> dict:
        """The largest rank's peak and activation bytes for one step at global length ``seq``."""
        import torch.distributed as dist

        external = [self.model, *(b.grad_data for b in self.model.buffers)]
        t0 = time.perf_counter()
        p = measure_peak(lambda: self.step(seq), external, optimizer=self.optimizer.optimizer)
        seconds = time.perf_counter() - t0
        per_rank = torch.tensor([p["total"], seconds], dtype=torch.float64)
        dist.all_reduce(per_rank, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0:
            print(f"  S={seq:6d}: peak {per_rank[0] / 2**20:8.2f} MiB, {per_rank[1]:.1f} s", flush=True)
        return dict(seq=seq, peak=int(per_rank[0]), seconds=float(per_rank[1]), rank0_breakdown=p)

    def longest(self, measured: list, fixed: float, bytes_per_token: float, budget: int,
                tolerance: float = 0.02, tries: int = 8) -> dict:
        """The longest global length (a multiple of the layout's granularity) whose peak fits the
        budget, to within ``tolerance``: first the straight line's prediction, then regula falsi
        between the longest measured length that fits and the shortest that does not (the peak
        grows a little faster than linearly, so the line alone overshoots)."""
        fit = max((r for r in measured if r["peak"] <= budget), key=lambda r: r["seq"])
        over = None
        seq = predicted = self._round((budget - fixed) / bytes_per_token)
        for _ in range(tries):
            r = self.peak(seq)
            if r["peak"] <= budget:
                fit = max(fit, r, key=lambda x: x["seq"])
            else:
                over = min(over or r, r, key=lambda x: x["seq"])
            if over is None:
                seq = self._round(fit["seq"] * (1 + 2 * tolerance))
                continue
            if over["seq"] - fit["seq"] <= max(self.granularity, tolerance * fit["seq"]):
                break
            step = (budget - fit["peak"]) * (over["seq"] - fit["seq"]) / (over["peak"] - fit["peak"])
            seq = min(max(self._round(fit["seq"] + step), fit["seq"] + self.granularity),
                      over["seq"] - self.granularity)
        return dict(fit, predicted_seq=predicted, shortest_over=over and over["seq"])

    def _round(self, seq: float) -> int:
        return max(self.granularity, int(seq) // self.granularity * self.granularity)


def layout_body(name: str, layout: Layout, seq: int, budget, out_path: str) -> None:
    """On each rank of a TP x CP world: warm up, peaks at seq/2 and seq, the longest S for the budget."""
    import torch.distributed as dist

    trainer = Trainer(layout, max_seq=16 * seq)
    trainer.step(trainer.granularity * 8)  # warm-up: creates Adam's state
    points = [trainer.peak(seq // 2), trainer.peak(seq)]
    bytes_per_token = (points[1]["peak"] - points[0]["peak"]) / (seq - seq // 2)
    fixed = points[1]["peak"] - bytes_per_token * seq
    if budget is None:  # the single rank defines the budget: its own peak at seq
        budget = points[1]["peak"]
    result = dict(layout=name, tp=layout.tp, cp=layout.cp, cp_comm_type=layout.cp_comm_type,
                  hierarchical=layout.hierarchical, world=layout.world, budget=budget, points=points, fixed=fixed,
                  act=points[1]["peak"] - fixed, bytes_per_token=bytes_per_token,
                  longest=trainer.longest(points, fixed, bytes_per_token, budget))
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)


def run(seq: int, names) -> dict:
    """Every layout of ``names`` (the single rank "1" first: its peak at ``seq`` is the budget)."""
    results, budget = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            layout = LAYOUTS[name]
            path = os.path.join(tmp, "result.json")
            t0 = time.perf_counter()
            run_on_ranks(layout_body, layout.world, name, layout, seq, budget, path, timeout=2400)
            with open(path) as f:
                results.append(json.load(f))
            budget = results[0]["budget"]
            print(f"{name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return summarize(results, dict(shape=SHAPE, vocab=VOCAB, seq=seq, dtype="fp32", batch=1,
                                   recompute="full uniform 1", mini_sequences="auto", threads_per_rank=1,
                                   budget_bytes=budget))


def summarize(results: list, settings: dict) -> dict:
    """The report of the layouts' results (the single rank's first): each one's activations against
    ``1/(TP x CP)`` of the single rank's and its longest S against the single rank's, and the targets:
    ``target_met`` (every layout's activations within :data:`TARGET_SLACK`), ``reach_met`` (every layout
    of :data:`REACH_TARGET`'s world reaches its factor; None when none was measured)."""
    single = results[0]
    if single["world"] != 1:
        raise ValueError(f"the first result must be the single rank's (it sets the budget), got {single['layout']!r}")
    for r in results:
        r["act_ratio"] = r["act"] / single["act"]
        r["act_target"] = 1 / r["world"]
        r["act_vs_target"] = r["act_ratio"] / r["act_target"]
        r["longest_vs_single"] = r["longest"]["seq"] / single["longest"]["seq"]
    world, factor = REACH_TARGET
    reach = [r["longest_vs_single"] >= factor for r in results if r["world"] == world]
    return dict(machine=machine(), settings=settings, results=results,
                target_met=all(r["act_vs_target"] <= 1 + TARGET_SLACK for r in results),
                reach_met=all(reach) if reach else None)


def print_table(report) -> None:
    mib = lambda n: f"{n / 2**20:8.1f}"  # noqa: E731
    s = report["settings"]
    print(f"\nper-rank peak of one training step at S={s['seq']} (largest rank, MiB); longest S for a "
          f"per-rank budget of {s['budget_bytes'] / 2**20:.1f} MiB")
    print(f"{'layout':16s} {'world':>5s} {'peak':>8s} {'fixed':>8s} {'act':>8s} {'act/1':>7s} {'1/(TPxCP)':>9s} "
          f"{'ratio':>6s} {'longest S':>9s} {'x single':>8s} {'its peak':>8s}")
    for r in report["results"]:
        p, lo = r["points"][1], r["longest"]
        print(f"{r['layout']:16s} {r['world']:5d} {mib(p['peak'])} {mib(r['fixed'])} {mib(r['act'])} "
              f"{r['act_ratio']:7.3f} {r['act_target']:9.3f} {r['act_vs_target']:6.3f} {lo['seq']:9d} "
              f"{r['longest_vs_single']:8.2f} {mib(lo['peak'])}")
    world, factor = REACH_TARGET
    print(f"target (activations within {TARGET_SLACK:.0%} of 1/(TP x CP)) met: {report['target_met']}; "
          f"target (longest S at world {world} >= {factor:g}x the single rank's) met: {report['reach_met']}")


def report_rows(report, prov) -> list:
    """One row per layout of a report of :func:`run`."""
    s, shape = report["settings"], report["settings"]["shape"]
    text = shape_text(L=shape["num_layers"], h=shape["hidden_size"], ffn=shape["ffn_hidden_size"],
                      heads=f"{shape['num_attention_heads']}/{shape['num_query_groups']}", V=s["vocab"], S=s["seq"],
                      b=s["batch"])
    name = machine_name(report["machine"], s["threads_per_rank"]) + " per rank"
    return [make_row("context_parallel_step", r["layout"], text, s["dtype"], name,
                     {"tp": r["tp"], "cp": r["cp"], "world": r["world"], "peak_bytes": r["points"][1]["peak"],
                      "fixed_bytes": r["fixed"], "act_bytes": r["act"], "bytes_per_token": r["bytes_per_token"],
                      "budget_bytes": r["budget"], "longest_seq": r["longest"]["seq"],
                      "longest_peak_bytes": r["longest"]["peak"], "points": r["points"]}, prov)
            for r in report["results"]]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=4096,
                        help="global sequence length for the memory table (at 2048 a CP 8 rank's 256 tokens are "
                             "about two MLP chunks, and at --seq / 2 its step's peak is Adam's update)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), metavar="NAME",
                        help=f"layouts to measure, the single rank first (default: all of {list(LAYOUTS)})")
    add_rows_argument(parser)
    args = parser.parse_args(argv)
    unknown = [n for n in args.layouts if n not in LAYOUTS]
    if unknown or args.layouts[0] != "1":
        parser.error(f"--layouts must start with '1' (the single rank sets the budget) and name layouts of "
                     f"{list(LAYOUTS)}, got {args.layouts}")
    granularity = max(LAYOUTS[n].granularity for n in args.layouts)
    if args.seq % (2 * granularity):
        parser.error(f"--seq must be a multiple of {2 * granularity} (so is --seq / 2 of {granularity}), "
                     f"got {args.seq}")
    return args


def main(argv=None):
    args = parse_args(argv)
    prov = provenance("python -m benchmarks.bench_context_parallel")  # the code as it is when the run starts
    report = run(args.seq, args.layouts)
    print_table(report)
    path = rows_path(args)
    if path:
        write_rows(report_rows(report, dict(prov, load_average_end=load_average())), path)


if __name__ == "__main__":
    main()
