"""The MST head's weight gradient into DDP's fp32 ``main_grad`` at Llama-3-8B size, simulated: the
peak of one head step (forward and backward of ``MiniSequenceLMHead`` under megatron DDP, bf16
weights, fp32 ``main_grad``, a mean loss) above what exists before it and the input gradient it
leaves, with the head's own ``V/TP x h`` fp32 sum (the head before ``main_grad``) and into
``main_grad``, in the first step (nothing expected: the weight gradient formed in backward) and once
the mean's upstream value is expected (formed in forward). Fake tensors (``mst_megatron.simulate``)
on the fake process group; MemTracker's peak. ``tests/unit/modules/test_lm_head.py`` measures the
same on real tensors at a small size. Rows: benchmark ``sim_lm_head_main_grad``.

    python -m benchmarks.sim_lm_head                     # h 4096, V 128256, S 8192, TP 1
"""

import argparse
from typing import Dict, List, Optional

import torch

from benchmarks.common import add_rows_argument, make_row, provenance, rows_path, shape_text, write_rows

MACHINE = "simulated (fake tensors)"


def head_peaks(hidden_size: int, vocab: int, seq: int, chunks: int) -> Dict[str, int]:
    """Peak bytes above the floor of the head's first and later steps, each way (see the docstring)."""
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from mst_megatron import simulate
    from mst_megatron.measure.memory import measure_peak
    from mst_megatron.modules.lm_head import MiniSequenceLMHead
    from tests.helpers.models import tiny_config

    peaks = {}
    for way in ("own fp32 sum", "into main_grad"):
        with simulate.fake_world(0, 1), simulate.fake_tensors():
            config = tiny_config(hidden_size=hidden_size, bf16=True, params_dtype=torch.bfloat16,
                                 perform_initialization=False)
            layer = tensor_parallel.ColumnParallelLinear(hidden_size, vocab, config=config,
                                                         init_method=config.init_method, bias=False)
            model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                            MiniSequenceLMHead.adopt(layer, chunks))
            hidden = torch.empty(seq, 1, hidden_size, dtype=torch.bfloat16).requires_grad_()
            labels = torch.zeros(1, seq, dtype=torch.long)
            floor = measure_peak(lambda: None, [model, hidden, labels])["total"] + hidden.numel() * 2
            saved = MiniSequenceLMHead.main_grad_sum
            if way == "own fp32 sum":
                MiniSequenceLMHead.main_grad_sum = lambda self, weight: None
            try:
                for step in ("first step", "later step", "later step"):  # expected from the third on
                    def run():
                        model.zero_grad_buffer()
                        hidden.grad = None
                        model(hidden, labels=labels)[0].float().mean().backward()
                    peaks[f"{way}, {step}"] = measure_peak(run, [model, hidden, labels])["total"] - floor
            finally:
                MiniSequenceLMHead.main_grad_sum = saved
    return peaks


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--mini-sequences", type=int, default=8)
    add_rows_argument(p)
    args = p.parse_args(argv)
    prov = provenance("python -m benchmarks.sim_lm_head")
    peaks = head_peaks(args.hidden_size, args.vocab, args.seq, args.mini_sequences)
    sum_bytes = args.vocab * args.hidden_size * 4
    shape = shape_text(M=args.mini_sequences, h=args.hidden_size, V=args.vocab, S=args.seq, b=1)
    rows = []
    for way in ("own fp32 sum", "into main_grad"):
        first, later = peaks[f"{way}, first step"], peaks[f"{way}, later step"]
        print(f"{way:15s}: above the floor {first / 2**30:.3f} GiB (first step), {later / 2**30:.3f} GiB (later)")
        rows.append(make_row("sim_lm_head_main_grad", way, shape, "bf16", MACHINE,
                             dict(above_floor_first_bytes=first, above_floor_later_bytes=later,
                                  sum_bytes=sum_bytes), prov))
    for step in ("first step", "later step"):
        saved = peaks[f"own fp32 sum, {step}"] - peaks[f"into main_grad, {step}"]
        print(f"saved ({step}): {saved / 2**30:.3f} GiB; V x h x 4 = {sum_bytes / 2**30:.3f} GiB")
    path = rows_path(args)
    if path:
        write_rows(rows, path)
    return rows


if __name__ == "__main__":
    main()
