"""The pretraining pipeline end to end on a tiny corpus: tokenizer, preprocessing, 2-rank torchrun
training (TP=2, MST) with validation and checkpoints, exact resume, MST <-> stock megatron-core
checkpoint loading, SIGTERM, the distributed optimizer with bf16, context parallelism (CP=2), and
the bad-input errors. Seven torchrun launches in all.
"""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.pretraining import CONFIGS, MODEL, ROOT, RUN, SCRIPT

STEP = re.compile(r"^iter\s+(\d+)/\d+ \| loss ([0-9.]+)")
VALID = re.compile(r"^validation at iter (\d+) \| val loss ([0-9.]+)")


def _argv(corpus, *extra):
    return ["--tokenizer-model", corpus["tokenizer"], "--data-path", *corpus["data"], *MODEL, *RUN, *extra]


def _launch(corpus, *extra, tp=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT,
           *_argv(corpus, "--tensor-model-parallel-size", str(tp), *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, lines=()):
    import psutil

    try:
        out = "".join(lines) + proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:  # timed out: leave no rank behind (workers outlive a killed torchrun)
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
    assert proc.returncode == 0, out
    steps = {int(m[1]): float(m[2]) for m in map(STEP.match, out.splitlines()) if m}
    valid = {int(m[1]): float(m[2]) for m in map(VALID.match, out.splitlines()) if m}
    return out, steps, valid


def _train(corpus, *extra, tp=2):
    return _finish(_launch(corpus, *extra, tp=tp))


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def uninterrupted(corpus):
    """Run A: 8 steps with MST from scratch, checkpoints at 4 and 8."""
    save = str(corpus["work"] / "ckpt_a")
    out, steps, valid = _train(corpus, "--save", save, "--save-interval", "4")
    return dict(save=save, out=out, steps=steps, valid=valid)


def test_trains_evaluates_and_saves(uninterrupted):
    steps, valid, save = uninterrupted["steps"], uninterrupted["valid"], uninterrupted["save"]
    assert sorted(steps) == list(range(1, 9))
    assert sorted(valid) == [0, 4, 8]
    assert valid[8] < valid[0] - 0.3, valid  # the validation loss has clearly fallen
    assert "MST: mlp_mini_sequences=auto" in uninterrupted["out"]
    assert re.search(r"tokens/s \| .* ms/step \| peak RSS [0-9.,]+ MiB", uninterrupted["out"])
    assert "val ppl" in uninterrupted["out"]
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "8"
    assert os.path.isdir(os.path.join(save, "iter_0000004")) and os.path.isdir(os.path.join(save, "iter_0000008"))
    # The loss plot next to the checkpoint, and the points it draws: every step's and eval's loss.
    with open(os.path.join(save, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(save, "loss.json")) as f:
        points = json.load(f)
    tokens_per_step = points["tokens_per_step"]
    assert [t // tokens_per_step for t, _ in points["train"]] == sorted(steps)
    assert {t // tokens_per_step: v for t, v in points["valid"]} == pytest.approx(valid, rel=1e-6)


def test_resume_matches_uninterrupted_run(corpus, uninterrupted):
    """Run B: resume A's iteration-4 checkpoint; steps 5..8 equal A's (fp32)."""
    out, steps, _ = _train(corpus, "--load", uninterrupted["save"], "--ckpt-step", "4")
    assert "resumed from" in out
    assert sorted(steps) == [5, 6, 7, 8]
    for i in steps:
        assert _rel(steps[i], uninterrupted["steps"][i]) <= 1e-6, (i, steps[i], uninterrupted["steps"][i])


@pytest.fixture(scope="module")
def stock_run(corpus, uninterrupted):
    """Run C: stock megatron-core (--no-mst) resumes A's MST checkpoint at 4, saves at 6 and 8."""
    save = str(corpus["work"] / "ckpt_stock")
    out, steps, _ = _train(corpus, "--no-mst", "--load", uninterrupted["save"], "--ckpt-step", "4",
                           "--save", save, "--save-interval", "2")
    return dict(save=save, out=out, steps=steps)


def test_mst_checkpoint_loads_into_stock_model(uninterrupted, stock_run):
    assert "stock megatron-core" in stock_run["out"]
    assert sorted(stock_run["steps"]) == [5, 6, 7, 8]
    for i, loss in stock_run["steps"].items():  # same weights and optimizer state: same losses
        assert _rel(loss, uninterrupted["steps"][i]) <= 1e-5, (i, loss, uninterrupted["steps"][i])


def test_stock_checkpoint_loads_into_mst_and_sigterm_saves(corpus, uninterrupted, stock_run):
    """Run D: MST resumes C's stock checkpoint at 6; SIGTERM to one rank during setup makes both
    ranks save after the next step and exit cleanly."""
    import psutil

    save = str(corpus["work"] / "ckpt_sigterm")
    proc = _launch(corpus, "--load", stock_run["save"], "--ckpt-step", "6", "--save", save)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("model "):  # printed once the model is built: the handler is in place
            workers = psutil.Process(proc.pid).children()
            assert len(workers) == 2, workers
            os.kill(workers[0].pid, signal.SIGTERM)
            break
    out, steps, _ = _finish(proc, lines)
    assert "SIGTERM received: saving and stopping at iteration 7" in out, out
    assert list(steps) == [7]
    assert _rel(steps[7], uninterrupted["steps"][7]) <= 1e-5, (steps[7], uninterrupted["steps"][7])
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "7"


def test_distributed_optimizer_bf16_trains_and_resumes_exactly(corpus):
    """Runs E and F: DP=2 with the distributed optimizer (optimizer state sharded over both ranks) and
    bf16; F resumes E's iteration-4 checkpoint and repeats E's steps 5..8."""
    flags = ("--use-distributed-optimizer", "--bf16")
    save = str(corpus["work"] / "ckpt_distopt")
    out, steps, valid = _train(corpus, *flags, "--save", save, "--save-interval", "4", tp=1)
    assert "DP=2" in out and "bf16 on" in out
    assert sorted(steps) == list(range(1, 9)) and valid[8] < valid[0] - 0.3, valid
    _, resumed, _ = _train(corpus, *flags, "--load", save, "--ckpt-step", "4", tp=1)
    assert sorted(resumed) == [5, 6, 7, 8]
    for i in resumed:
        assert _rel(resumed[i], steps[i]) <= 1e-6, (i, resumed[i], steps[i])


def test_context_parallel_trains_like_tensor_parallel(corpus, uninterrupted):
    """Run G: CP=2 (each rank holds two of four chunks of every sequence, megatron's layout) from
    scratch: step by step the losses of run A (TP=2), the same model, weights and data sharded
    another way."""
    out, steps, valid = _train(corpus, "--context-parallel-size", "2", tp=1)
    assert "TP=1 PP=1 CP=2 DP=1" in out
    assert sorted(steps) == list(range(1, 9)) and valid[8] < valid[0] - 0.3, valid
    for i, loss in steps.items():
        assert _rel(loss, uninterrupted["steps"][i]) <= 1e-5, (i, loss, uninterrupted["steps"][i])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(data=["/nonexistent/corpus"]), r"--data-path /nonexistent/corpus: missing /nonexistent/corpus\.bin"),
        (dict(tokenizer="small_tokenizer"), r"holds token id \d+, but --tokenizer-model has \d+ tokens"),
        (dict(extra=["--seq-length", "256"]), r"--seq-length 256 exceeds the model's max_position_embeddings \(128\)"),
        (dict(extra=["--tensor-model-parallel-size", "3"]), r"world size 2 is not divisible by --tensor-model-parallel"),
        (dict(extra=["--context-parallel-size", "2", "--seq-length", "66"]),
         r"--context-parallel-size 2: --seq-length 66 must be divisible by 2 x --context-parallel-size = 4"),
        (dict(extra=["--context-parallel-size", "2", "--no-mst"]), r"--context-parallel-size 2 needs MST's attention"),
        (dict(extra=["--context-parallel-size", "2", "--num-attention-heads", "6",
                     "--num-query-groups", "3", "--hidden-size", "96"]),
         r"the key/value groups per tensor-parallel rank \(num_query_groups 3 / --tensor-model-parallel-size 1 = 3\)"),
        (dict(extra=["--context-parallel-size", "2", "--cp-comm-type", "a2a+p2p",
                     "--hierarchical-context-parallel-sizes", "2", "2"]),
         r"--cp-comm-type a2a\+p2p: --hierarchical-context-parallel-sizes \[2, 2\] must be two sizes \(all-to-all, "
         r"ring\) whose product is --context-parallel-size 2; possible: none"),
        (dict(extra=["--context-parallel-size", "2", "--hierarchical-context-parallel-sizes", "1", "2"]),
         r"--hierarchical-context-parallel-sizes needs --cp-comm-type a2a\+p2p"),
        # megatron-core would loop forever building a split that holds no document
        (dict(extra=["--split", "949,50,1"]), r"the test share of --data-path \S+ \(\d+ documents\) holds no document"),
    ],
)
def test_bad_input_fails_before_any_work(corpus, monkeypatch, capsys, change, message):
    from mst_megatron.training import pretrain

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = ["--tokenizer-model", corpus[change.get("tokenizer", "tokenizer")],
            "--data-path", *change.get("data", [corpus["code"]]), *MODEL, *RUN, *change.get("extra", [])]
    assert pretrain.main(argv, CONFIGS) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1, err
    import torch.distributed as dist

    assert not dist.is_initialized()  # nothing started


# Parameter counts published for each model (rounded to 10M).
@pytest.mark.parametrize("name, billions", [("llama3-8b", 8.03), ("llama3-70b", 70.55), ("llama2-7b", 6.74),
                                            ("mistral-7b", 7.25), ("qwen2-7b", 7.62)])
def test_model_configs_have_the_published_shapes(name, billions):
    from mst_megatron.training import model_config

    shape = model_config.load_model_shape(name, CONFIGS)
    assert shape.parameter_count(shape.vocab_size) / 1e9 == pytest.approx(billions, abs=0.006)
    config = model_config.transformer_config(shape, tensor_model_parallel_size=1)
    assert config.num_query_groups == shape.num_query_groups and config.add_qkv_bias == shape.add_qkv_bias
