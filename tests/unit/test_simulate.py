"""The simulator (``mst_megatron.simulate``) in this process: the context-parallel exchange the flags
name is the one its simulated step runs (``--cp-comm-type``, ``--hierarchical-context-parallel-sizes``)."""

import json

import os

import pytest

from mst_megatron.modules import attention
from tests.helpers import CONFIGS

BASE = ["--model-config", "tiny", "--vocab-size", "512", "--seq-length", "256", "--world-size", "4",
        "--context-parallel-size", "4"]


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
