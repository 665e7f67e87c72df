"""The reach table: the longest sequence whose full training step (forward, backward, Adam's state)
fits 80 GB GPUs, by GPU count, for Llama-3-8B and Llama-3-70B, simulated (``mst_megatron.simulate``
with CUDA's kernels, ``--seq-length auto``), for:

* ``stock, full recompute`` / ``stock, no recompute``: megatron-core's ``GPTModel``, MLP and LM head
  with MST's SDPA attention (``--no-mst --stock-attention sdpa``: a flash kernel, context parallel);
* ``MST``: the MST model under full recompute; ``MST + offload``: with ``--offload-layer-inputs``;
  both with the MLP in 32 mini-sequences (``auto``'s hidden-size chunks would be ``S / h`` of them:
  the simulation's time grows with the chunk count while the peak barely moves; Llama-3-8B on 8 GPUs
  at 512K: 49.47 GiB with ``auto``'s 128 chunks, 49.56 with 32, simulated in 232 s and 109 s).

Layout per GPU count: TP ``min(8, GPUs)`` with SP, DP 1, CP the rest after the pipeline stages:
the fewest (1, 2, 4) with which some length fits; CP's all-to-all where the heads allow it, else the
ring; the distributed optimizer (sharded over CP). Adam's state stays on the device where the
weights, gradient buffers and Adam's state take at most half the budget there
(:data:`STATIC_SHARE`), else it goes to host memory (megatron-core's ``optimizer_cpu_offload``:
master weights and moments, as the row says): a device nearly filled by them leaves a few thousand
tokens (Llama-3-70B on 32 GPUs: 24K). More pipeline stages would buy room for weights and Adam only:
under 1F1B the first stage keeps ``PP`` micro-batches of ``L / PP`` layers in flight, as many layer
inputs as one micro-batch of all ``L`` (and each stage's simulation runs ``PP`` micro-batches).
Rows: benchmark ``sim_reach``.

    python -m benchmarks.sim_reach                          # both models, 1/8/32/64 GPUs
    python -m benchmarks.sim_reach --models llama3-8b --gpus 1 8
"""

import argparse
import time
from typing import Dict, List, Optional

from benchmarks.common import add_rows_argument, make_row, provenance, rows_path, write_rows

RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
MST = [*RECOMPUTE, "--mlp-mini-sequences", "32"]
VARIANTS = {
    "stock, full recompute": ["--no-mst", "--stock-attention", "sdpa", *RECOMPUTE],
    "stock, no recompute": ["--no-mst", "--stock-attention", "sdpa"],
    "MST": MST,
    "MST + offload": [*MST, "--offload-layer-inputs"],
}
STATIC_SHARE = 0.5  # Adam's state goes to host memory where, on the device, the static tensors take more
OFFLOAD_GPUS = (1, 8)  # the GPU counts the offload variant is simulated at
MACHINE = "simulated (fake tensors, CUDA kernels)"


def layouts(gpus: int) -> List[List[str]]:
    """The layout flags tried for ``gpus`` (see the module docstring), fewest pipeline stages first."""
    tp = min(8, gpus)
    out = []
    for pp in (1, 2, 4):
        if gpus % (tp * pp):
            continue
        flags = ["--world-size", str(gpus), "--tensor-model-parallel-size", str(tp),
                 "--pipeline-model-parallel-size", str(pp), "--context-parallel-size", str(gpus // (tp * pp))]
        out.append(flags + (["--sequence-parallel"] if tp > 1 else []))
    return out


def longest(model: str, gpus: int, variant: str, gpu_gib: float) -> Dict:
    """One table cell: the longest fitting length of the first of :func:`layouts` where any fits
    (Adam's state placed by :func:`static_share`), with every search it took."""
    from mst_megatron import simulate
    from mst_megatron.layout import LayoutError
    from mst_megatron.training import SetupError

    base = ["--model-config", model, "--bf16", "--use-distributed-optimizer", "--gpu-memory-gib", str(gpu_gib),
            "--seq-length", "auto", "--seq-step", str(2048 * max(1, gpus // 8)), *VARIANTS[variant]]
    tried = []
    for flags in layouts(gpus):
        for comm in ("a2a", "p2p"):
            try:
                args, shape = simulate.parse(base + flags + ["--cp-comm-type", comm])
                static = static_share(args, shape)
            except (SetupError, LayoutError) as e:  # a layout the heads or sizes refuse
                tried.append(dict(flags=flags + [comm], refused=str(e)[:160]))
                continue
            offload = ["--optimizer-cpu-offload"] if static > STATIC_SHARE else []
            if offload:
                args, shape = simulate.parse(base + flags + offload + ["--cp-comm-type", comm])
            found = simulate.longest_fitting(args, shape)
            tried.append(dict(flags=flags + offload + [comm], static_share=round(static, 4), lengths=found["tried"]))
            if found["best"] is not None:
                return dict(best=found["best"], tried=tried)
            break  # the all-to-all when it serves, else the ring
    return dict(best=None, tried=tried)


def static_share(args, shape) -> float:
    """The share of the budget that weights, gradient buffers and Adam's state (on the device) take
    on the busiest rank, from one step at the search's shortest length."""
    from mst_megatron import simulate

    report = simulate.simulate(args, shape, simulate.search_unit(args))
    m = report["busiest"]["memory"]
    return (m["weights"] + m["grads"] + m["optimizer"] + m["other_static"]) / report["budget_bytes"]


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["llama3-8b", "llama3-70b"])
    p.add_argument("--gpus", type=int, nargs="*", default=[1, 8, 32, 64])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    add_rows_argument(p)
    args = p.parse_args(argv)
    prov, rows, path = provenance("python -m benchmarks.sim_reach"), [], rows_path(args)
    for model in args.models:
        for gpus in args.gpus:
            for variant in args.variants:
                if variant == "MST + offload" and gpus not in OFFLOAD_GPUS:
                    continue
                t0 = time.time()
                found = longest(model, gpus, variant, args.gpu_memory_gib)
                b = found["best"]
                metrics = dict(seconds=round(time.time() - t0, 1), searched=found["tried"])
                if b is None:
                    metrics.update(longest_seq=0)
                else:
                    m = b["busiest"]["memory"]
                    metrics.update(longest_seq=b["seq_length"], peak_bytes=m["peak"], host_bytes=m["host"],
                                   budget_bytes=b["budget_bytes"], layout=b["layout"],
                                   flops=b["busiest"]["flops"]["total"])
                print(f"{model} {gpus:3d} GPUs {variant:22s}: "
                      + (f"{b['seq_length']:>9,d} tokens, layout {b['layout']}" if b else "nothing fits")
                      + f" ({metrics['seconds']} s)", flush=True)
                rows.append(make_row("sim_reach", variant, f"model={model} GPUs={gpus}", "bf16", MACHINE,
                                     metrics, prov))
                if path:
                    write_rows(rows[-1:], path)
    return rows


if __name__ == "__main__":
    main()
