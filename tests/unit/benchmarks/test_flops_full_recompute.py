"""The full-recompute FLOP count (benchmarks/flops_full_recompute.py) at a small shape, under fake
tensors: MST's decoder costs exactly one MLP forward GEMM unit (fc2's, 2 T h F) per layer less than
stock+SDPA's (11 units against 12), the heads cost the same, and attention is counted."""

import pytest

pytestmark = pytest.mark.usefixtures("one_rank")


@pytest.mark.parametrize("method", ["uniform", "block"])
def test_full_recompute_flops(method):
    import torch

    from benchmarks.flops_full_recompute import step_flops
    from tests.helpers.models import tiny_config

    layers, seq, ffn, vocab = 3, 300, 160, 512
    config = tiny_config(num_layers=layers, ffn_hidden_size=ffn, params_dtype=torch.bfloat16, bf16=True,
                         recompute_granularity="full", recompute_method=method, recompute_num_layers=1)
    counted = {v: step_flops(v, config, vocab, seq) for v in ("sdpa", "mst")}
    uncounted = {v: step_flops(v, config, vocab, seq, attention="none") for v in ("sdpa", "mst")}
    # block with recompute_num_layers=1: only the first layer is recomputed, the others cost 9 vs 11
    saved_units = layers if method == "uniform" else 1 - 2 * (layers - 1)
    unit = 2 * seq * config.hidden_size * ffn
    for flops in (counted, uncounted):
        assert flops["sdpa"]["decoder"] - flops["mst"]["decoder"] == saved_units * unit
        heads = {v: flops[v]["total"] - flops[v]["decoder"] for v in flops}
        assert heads["sdpa"] == heads["mst"]
    assert counted["sdpa"]["decoder"] > uncounted["sdpa"]["decoder"]  # the CPU flash kernels count
