"""Parallel-size planner: the suggested layout, its MST counts and memory terms, and bad input."""

import re

import pytest

from tests.helpers import CONFIGS

GIB = 1024**3


@pytest.fixture(scope="module")
def llama3_8b():
    from mst_megatron.training.model_config import load_model_shape

    return load_model_shape("llama3-8b", CONFIGS)


def test_cli_prints_layout_mst_counts_memory_and_flags(capsys):
    from mst_megatron.launch.plan import main

    argv = ["--config", "llama3-8b", "--nodes", "1", "--gpus-per-node", "8", "--seq-length", "131072",
            "--gpu-memory-gib", "80"]
    assert main(argv, CONFIGS) == 0
    out = capsys.readouterr().out
    assert "suggested: TP=2 PP=1 CP=1 DP=4 (TP within a node), sequence parallel on" in out, out
    # Llama-3-8B: auto MLP chunks of h = 4096 tokens; head ceil((128256 / TP) / 4096) = 16 chunks
    assert ("mlp_mini_sequences=auto -> 32 chunks of 4096 tokens; "
            "lm_head_mini_sequences=auto -> 16 chunks of 8192 tokens") in out
    assert re.search(r"expected peak per GPU: [0-9.]+ GiB = weights [0-9.]+ \+ gradients", out), out
    flags = out.split("flags: ")[1].splitlines()[0].split()
    assert flags[:2] == ["--max-position-embeddings", "131072"]  # the config says 8192
    assert "--sequence-parallel" in flags and flags[flags.index("--tensor-model-parallel-size") + 1] == "2"


def test_memory_terms(llama3_8b):
    from mst_megatron.launch.plan import estimate_memory
    from mst_megatron.layout import ParallelLayout as Layout

    base = estimate_memory(llama3_8b, 131072, Layout(tp=8, sp=True))
    # Weights: every parameter (vocab padded to 128 x TP) in bf16, split over TP=8.
    assert base.memory["weights"] == pytest.approx(llama3_8b.parameter_count(128256) * 2 / 8, rel=1e-3)
    assert base.memory["gradients"] == 2 * base.memory["weights"]
    # Layer inputs: 32 layers x [S / TP, h] bf16 = 32 x 16384 x 4096 x 2 bytes = 4 GiB.
    assert base.memory["stored layer inputs"] == 4 * GIB
    # The distributed optimizer splits Adam states over DP x CP; CP and PP shrink what they should.
    wider = estimate_memory(llama3_8b, 131072, Layout(tp=8, pp=2, cp=2, dp=2, sp=True))
    assert wider.memory["optimizer"] < base.memory["optimizer"] / 4 / 1.9
    assert wider.memory["stored layer inputs"] == base.memory["stored layer inputs"] / 2
    replicated = estimate_memory(llama3_8b, 131072, Layout(tp=8, dp=4, sp=True), distributed_optimizer=False)
    assert replicated.memory["optimizer"] == base.memory["optimizer"]
    # Explicit MST counts are used as given.
    counted = estimate_memory(llama3_8b, 131072, Layout(tp=8, sp=True), mlp_mini_sequences=8,
                              lm_head_mini_sequences=2)
    assert (counted.mlp_chunks, counted.head_chunks) == (8, 2) and counted.peak > base.peak


def test_longer_sequences_need_more_model_parallelism(llama3_8b):
    from mst_megatron.launch.plan import suggest

    short, long = (suggest(llama3_8b, 4, 8, s, 80)[0] for s in (131072, 1048576))
    assert short.layout.dp > long.layout.dp and long.layout.cp > 1 and long.layout.tp == 8
    assert all(x.peak <= 0.85 * 80 * GIB for x in suggest(llama3_8b, 4, 8, 1048576, 80))


@pytest.mark.parametrize("kwargs, message", [
    (dict(nodes=3, tp=8, cp=2), r"3 nodes x 8 GPUs = 24 GPUs is not divisible by .* = 16"),
    (dict(tp=3), r"--tensor-model-parallel-size 3 must divide the 8 GPUs per node"),
    (dict(seq_length=16 * 1048576), r"no layout fits 68.0 GiB per GPU; the leanest .* add nodes or shorten"),
    (dict(nodes=0), r"nodes must be an int >= 1, got 0"),
    (dict(gpu_memory_gib=0), r"--gpu-memory-gib > 0 \(got 0\)"),
])
def test_bad_input(llama3_8b, kwargs, message):
    from mst_megatron.launch import LaunchError
    from mst_megatron.launch.plan import suggest
    from mst_megatron.layout import LayoutError

    args = {**dict(nodes=1, gpus_per_node=8, seq_length=131072, gpu_memory_gib=80), **kwargs}
    with pytest.raises((LaunchError, LayoutError), match=message):
        suggest(llama3_8b, **args)


def test_model_without_vocab_size_is_refused():
    from mst_megatron.launch import LaunchError
    from mst_megatron.launch.plan import suggest
    from mst_megatron.training.model_config import load_model_shape

    with pytest.raises(LaunchError, match="vocab_size null"):
        suggest(load_model_shape("tiny", CONFIGS), 1, 8, 1024, 80)


def test_cli_simulates_the_layouts_it_prints(capsys, tmp_path):
    import json
    import os

    from mst_megatron.launch.plan import main

    with open(os.path.join(CONFIGS, "tiny.json")) as f:
        tiny = dict(json.load(f), vocab_size=1000)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny))
    argv = ["--config", str(config), "--nodes", "1", "--gpus-per-node", "2", "--seq-length", "1024",
            "--gpu-memory-gib", "1", "--simulate"]
    assert main(argv, CONFIGS) == 0
    out = capsys.readouterr().out
    printed = re.findall(r"^suggested: (TP=\S+ PP=\S+ CP=\S+(?: \(\w+\))? DP=\S+)|^  also fits: (.+?): ", out, re.M)
    layouts = [a or b for a, b in printed]
    simulated = re.findall(r"^  (.+?): ([0-9.]+) GiB \(fits\); formula ([0-9.]+) GiB, error ([+-][0-9.]+)%$",
                           out.split("simulated (")[1], re.M)
    assert [s[0] for s in simulated] == layouts and len(layouts) == 4, out
    for _, peak, formula, error in simulated:  # the paper formula within 25% of the simulated step here
        assert float(peak) > 0 and abs(float(error)) < 25, out
