"""The simulator against the GPU: the H200 ``cuda_reach`` rows (``bench_cuda --reach``: a 32-layer
Llama-3-8B GPT, bf16 weights, full recompute, one forward + backward, no optimizer; ``sdpa`` and
``mst``) re-run under fake tensors on this CPU, and the simulated peak beside the measured one.

The simulated step is the benchmark's own: the same builder (``benchmarks.common.build_model``),
config, ``Float16Module``, inputs and ``.backward()``, inside :func:`mst_megatron.simulate.fake_tensors`
on a one-rank fake world, under ``MemTracker`` with the model tracked as existing before the step;
the peak is the tracker's total (weights, their ``.grad``, activations, temporaries). The GPU peak
is ``torch.cuda.max_memory_allocated`` (allocator blocks, rounded up to 512 bytes; no reserve).

Rows: benchmark ``sim_cuda_reach``, one per variant and length (metrics: simulated and measured peak,
relative error, seconds to simulate), machine this CPU.

    python -m benchmarks.sim_cuda_reach                        # every H200 row that did not run out of memory
    python -m benchmarks.sim_cuda_reach --layers 2 --seqs 4096 --rows ''   # a quick smoke run
"""

import argparse
import time
from typing import Dict, List, Optional

import torch

from benchmarks.common import (add_rows_argument, build_model, full_recompute_config, machine, machine_name,
                               make_row, model_inputs, model_shape, provenance, read_rows, rows_path, write_rows)

LLAMA3_8B = dict(hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8)
VOCAB = 128256
GPU = "NVIDIA H200"


def simulated_peak(variant: str, layers: int, seq: int) -> int:
    """Peak bytes of one ``bench_cuda`` reach step of ``variant``, simulated."""
    from megatron.core.transformer.module import Float16Module

    from mst_megatron.measure.memory import StepMemTracker
    from mst_megatron.simulate import fake_tensors, fake_world, kernel_workspaces

    config = full_recompute_config(LLAMA3_8B, torch.bfloat16, layers, use_cpu_initialization=True,
                                   perform_initialization=False)
    with fake_world(0, 1), fake_tensors():
        model = Float16Module(config, build_model(variant, config, VOCAB, seq))
        tokens, labels, positions = model_inputs(VOCAB, seq)
        tracker = StepMemTracker()
        tracker.track_external(model)
        with tracker, kernel_workspaces("cuda"):
            model(tokens, positions, None, labels=labels).mean().backward()
        snapshot = tracker.get_tracker_snapshot("peak")
    return sum(int(dev["Total"]) for dev in snapshot.values())


def measured(rows: List[Dict]) -> Dict:
    """``(variant, layers, seq) -> GPU peak bytes`` of the H200 reach rows that fit."""
    out = {}
    for r in rows:
        if r["benchmark"] == "cuda_reach" and r["machine"] == GPU and r["metrics"].get("peak_bytes"):
            fields = dict(f.split("=") for f in r["shape"].split())
            out[(r["variant"], int(fields["L"]), int(fields["S"]))] = r["metrics"]["peak_bytes"]
    return out


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seqs", type=int, nargs="*", default=None, help="default: the H200 rows' lengths")
    p.add_argument("--variants", nargs="*", default=["sdpa", "mst"])
    add_rows_argument(p)
    args = p.parse_args(argv)
    gpu = measured(read_rows())
    seqs = args.seqs or sorted({s for (_, layers, s) in gpu if layers == args.layers})
    prov, host, rows = provenance("python -m benchmarks.sim_cuda_reach"), machine(), []
    for variant in args.variants:
        for seq in seqs:
            t0 = time.time()
            peak = simulated_peak(variant, args.layers, seq)
            metrics = dict(simulated_peak_bytes=peak, seconds=round(time.time() - t0, 1))
            real = gpu.get((variant, args.layers, seq))
            if real:
                metrics.update(gpu_peak_bytes=real, rel_error=round(peak / real - 1, 4))
            print(f"{variant:5s} L={args.layers} S={seq}: simulated {peak / 2**30:.2f} GiB"
                  + (f", {GPU} {real / 2**30:.2f} GiB, error {peak / real - 1:+.1%}" if real else "")
                  + f" ({metrics['seconds']} s)", flush=True)
            rows.append(make_row("sim_cuda_reach", variant, model_shape(LLAMA3_8B, args.layers, VOCAB, seq), "bf16",
                                 machine_name(host), metrics, prov))
    path = rows_path(args)
    if path:
        write_rows(rows, path)
    return rows


if __name__ == "__main__":
    main()
