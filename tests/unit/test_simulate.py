"""The simulator (``mst_megatron.simulate``) in this process: the context-parallel exchange the flags
name is the one its simulated step runs (``--cp-comm-type``, ``--hierarchical-context-parallel-sizes``),
its FLOPs split into forward, recompute and backward, and its longest-length search."""

import json

import os

import pytest

from mst_megatron.modules import attention
from tests.helpers import CONFIGS

BASE = ["--model-config", "tiny", "--vocab-size", "512", "--seq-length", "256", "--world-size", "4",
        "--context-parallel-size", "4"]
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
STOCK = ["--no-mst", "--stock-attention", "sdpa"]


@pytest.mark.parametrize("flags, ring_calls", [
    (["--cp-comm-type", "p2p"], True),
    (["--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes", "2", "2"], True),
    (["--cp-comm-type", "a2a"], False),
])
def test_simulated_step_runs_the_named_exchange(flags, ring_calls, tmp_path, monkeypatch):
    calls = []
    ring = attention.ring_attention

    def counted(*args, **kwargs):
        calls.append(args[3].size())  # the ring group's size
        return ring(*args, **kwargs)

    monkeypatch.setattr(attention, "ring_attention", counted)
    from mst_megatron import simulate

    out = tmp_path / "report.json"
    assert simulate.main(BASE + flags + ["--json", str(out)]) == 0
    layout = json.loads(out.read_text())["layout"]
    assert layout["cp"] == 4 and layout["cp_comm_type"] == flags[1]
    if flags[1] == "a2a+p2p":
        assert layout["hierarchical_cp_sizes"] == [2, 2]
    with open(os.path.join(CONFIGS, "tiny.json")) as f:
        layers = json.load(f)["num_layers"]  # one attention forward per layer (no recompute)
    expected_ring = {"p2p": 4, "a2a+p2p": 2}.get(flags[1])
    assert calls == ([expected_ring] * layers if ring_calls else []), calls


@pytest.mark.parametrize("peak_of, budget, most_tries", [
    (lambda n: 1000 + 37 * n, 1000 + 37 * 1234 + 5, 5),  # linear: the line finds it, two checks
    (lambda n: 1000 + 37 * n + n // 64 * 300, 10**6, 8),  # linear with steps (chunk counts)
    (lambda n: 1000 + n * n, 10**7, 16),  # convex
    (lambda n: 10**4 + 10 * n + (3000 if n > 700 else 0), 2 * 10**4, 20),  # a jump: bisection's bound
    (lambda n: 1000 + 37 * n, 1000 + 37 * 4, 3),  # exactly the first guess
    (lambda n: 50000 + n, 10**4, 2),  # nothing fits: first, then 1
    (lambda n: 1000 + 37 * n, 1000 + 37 * 2, 4),  # first does not fit, 1 does
])
def test_longest_length_search_finds_the_largest_fitting(peak_of, budget, most_tries):
    from mst_megatron.simulate import largest_fitting

    n, tried = largest_fitting(peak_of, budget, first=4)
    assert n == max([k for k in range(1, 10**5) if peak_of(k) <= budget], default=0)
    assert len(tried) <= most_tries, tried
    assert len({k for k, _ in tried}) == len(tried)  # nothing evaluated twice


def test_flops_split_into_forward_recompute_and_backward():
    from mst_megatron import simulate

    seq = 512

    def flops(*flags):
        args, shape = simulate.parse(["--model-config", "tiny", "--vocab-size", "1000", *flags])
        return simulate.simulate(args, shape, seq)["busiest"]["flops"], shape

    plain, shape = flops(*STOCK)
    full, _ = flops(*STOCK, *RECOMPUTE)
    mst, _ = flops(*RECOMPUTE)
    for f in (plain, full, mst):
        assert f["forward"] + f["recompute"] + f["backward"] == f["total"], f
    assert plain["recompute"] == 0
    # full recompute adds the rerun forwards and changes nothing else
    assert (full["forward"], full["backward"]) == (plain["forward"], plain["backward"])
    assert full["recompute"] == full["total"] - plain["total"] > 0
    # stock's layer recompute reruns the whole MLP; MST's skips it and each chunk's own recompute
    # reruns fc1 alone: the difference is fc2's product, every layer
    fc2 = 2 * seq * shape.ffn_hidden_size * shape.hidden_size
    assert full["recompute"] - mst["recompute"] == shape.num_layers * fc2, (full, mst)
