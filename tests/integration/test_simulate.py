"""The simulator (``mst_megatron.simulate``) against real steps: the same model, DDP, optimizer state
and schedule step on real tensors on gloo ranks, measured by the same ``MemTracker``."""

import json
import os

import pytest

from tests.helpers.multirank import run_on_ranks

# tiny model, fp32, full recompute; the simulated and the real step of every rank.
BASE = ["--model-config", "tiny", "--vocab-size", "1000", "--kernels", "cpu", "--recompute-granularity", "full",
        "--recompute-method", "uniform", "--recompute-num-layers", "1", "--micro-batch-size", "1"]
LAYOUTS = {
    "single": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "cp2": (2, ["--context-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
}
SEQ = 256


def _real_and_simulated(argv, out_dir):
    import torch.distributed as dist

    from mst_megatron import simulate
    from mst_megatron.runtime.parallel import destroy_parallel, init_parallel

    args, shape = simulate.parse(argv + ["--world-size", os.environ["WORLD_SIZE"]])
    a = simulate.checked_args(args, shape, SEQ)
    init_parallel(a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.context_parallel_size,
                  a.virtual_pipeline_model_parallel_size, seed=a.seed)
    rank = dist.get_rank()
    try:
        real = simulate.step_report(a, shape, fake=False)
    finally:
        destroy_parallel()
    fake = simulate.simulate_rank(a, shape, rank)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(real=real, fake=fake), f)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_simulated_peak_matches_real_step(layout, tmp_path):
    world, flags = LAYOUTS[layout]
    run_on_ranks(_real_and_simulated, world, BASE + flags, str(tmp_path))
    for rank in range(world):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        real, fake = got["real"]["memory"], got["fake"]["memory"]
        print(f"{layout} rank {rank}: real peak {real['peak']} B, simulated {fake['peak']} B "
              f"({fake['peak'] / real['peak'] - 1:+.2%}); step {real['step_peak']} / {fake['step_peak']}")
        assert abs(fake["peak"] / real["peak"] - 1) < 0.03, (layout, rank, real, fake)
        assert got["fake"]["flops"]["total"] == got["real"]["flops"]["total"] > 0
