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

from tests.helpers import rel_err
from tests.helpers import CONFIGS, ROOT
from tests.helpers.corpus import MODEL, RUN, SCRIPT

STEP = re.compile(r"^iter\s+(\d+)/\d+ \| loss ([0-9.]+)")
VALID = re.compile(r"^validation at iter (\d+) \| val loss ([0-9.]+)")


def _argv(corpus, *extra):
    return ["--tokenizer-model", corpus["tokenizer"], "--data-path", *corpus["data"], *MODEL, *RUN, *extra]


def _launch(corpus, *extra, tp=2, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), SCRIPT,
           *_argv(corpus, "--tensor-model-parallel-size", str(tp), *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, lines=(), returncode=0):
    import psutil

    try:
        out = "".join(lines) + proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:  # timed out: leave no rank behind (workers outlive a killed torchrun)
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
    assert proc.returncode == returncode, out
    steps = {int(m[1]): float(m[2]) for m in map(STEP.match, out.splitlines()) if m}
    valid = {int(m[1]): float(m[2]) for m in map(VALID.match, out.splitlines()) if m}
    return out, steps, valid


def _train(corpus, *extra, tp=2, nproc=2):
    return _finish(_launch(corpus, *extra, tp=tp, nproc=nproc))


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
        assert rel_err(steps[i], uninterrupted["steps"][i]) <= 1e-6, (i, steps[i], uninterrupted["steps"][i])


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
        assert rel_err(loss, uninterrupted["steps"][i]) <= 1e-5, (i, loss, uninterrupted["steps"][i])


def test_stock_checkpoint_loads_into_mst_and_sigterm_saves(corpus, uninterrupted, stock_run):
    """Run D: MST resumes C's stock checkpoint at 6; SIGTERM to torchrun during setup (it passes the
    signal to every rank) makes the ranks save after the next step and exit 0; torchrun, signalled
    itself, exits 1 (README: "Pretraining")."""
    import psutil

    save = str(corpus["work"] / "ckpt_sigterm")
    proc = _launch(corpus, "--load", stock_run["save"], "--ckpt-step", "6", "--save", save)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("model "):  # printed once the model is built: the handler is in place
            workers = psutil.Process(proc.pid).children()
            assert len(workers) == 2, workers
            os.kill(proc.pid, signal.SIGTERM)
            break
    out, steps, _ = _finish(proc, lines, returncode=1)
    assert "SIGTERM received: saving and stopping at iteration 7" in out, out
    assert list(steps) == [7]
    assert rel_err(steps[7], uninterrupted["steps"][7]) <= 1e-5, (steps[7], uninterrupted["steps"][7])
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "7"


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2)])
def test_resume_under_another_layout(corpus, uninterrupted, tp, pp):
    """Runs H, I: A's TP=2 checkpoint at 4 resumed at TP=1 (DP=2) and at TP=2 x PP=2 (4 ranks): steps
    5..8 repeat A's (the same weights, optimizer state and batches, sharded another way)."""
    _, steps, _ = _train(corpus, "--load", uninterrupted["save"], "--ckpt-step", "4",
                         "--pipeline-model-parallel-size", str(pp), tp=tp, nproc=2 * pp)
    assert sorted(steps) == [5, 6, 7, 8]
    for i in steps:
        assert rel_err(steps[i], uninterrupted["steps"][i]) <= 1e-5, (i, steps[i], uninterrupted["steps"][i])


def _cosine_lr(step, decay_iters, lr=5e-3, min_lr=5e-4):
    import math

    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(step / decay_iters, 1.0)))


def test_extending_a_finished_run_follows_the_chosen_schedule(corpus, uninterrupted, monkeypatch):
    """A finished at 8 (cosine over 8 steps); --train-iters 10 (so --lr-decay-iters 10) is refused up
    front (test_bad_input...) unless a side is chosen: --override-opt_param-scheduler decays over 10
    steps from step 8 on, --use-checkpoint-opt_param-scheduler keeps A's schedule (min-lr after 8).
    The scheduler alone for both flags; the training loop for the override (run J)."""
    from megatron.core import dist_checkpointing

    from mst_megatron.training import arguments
    from mst_megatron.training.pretrain import build_scheduler

    saved = dist_checkpointing.load_common_state_dict(os.path.join(uninterrupted["save"], "iter_0000008"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for flag, lr_at_9 in (("--override-opt_param-scheduler", _cosine_lr(9, 10)),
                          ("--use-checkpoint-opt_param-scheduler", 5e-4)):
        args = arguments.check_args(arguments.build_parser().parse_args(
            ["--tokenizer-model", "t", "--data-path", "d", *RUN, "--train-iters", "10", "--load", "x", flag]))

        class Optimizer:  # what the scheduler touches
            param_groups = [{"lr": 0.0, "weight_decay": 0.0}]

        scheduler = build_scheduler(args, Optimizer())
        scheduler.load_state_dict(saved["opt_param_scheduler"])
        scheduler.step(increment=args.global_batch_size)
        assert Optimizer.param_groups[0]["lr"] == pytest.approx(lr_at_9, rel=1e-12), flag

    out, steps, _ = _train(corpus, "--load", uninterrupted["save"], "--train-iters", "10",
                           "--override-opt_param-scheduler")
    assert sorted(steps) == [9, 10], out
    lrs = {int(m[1]): float(m[2]) for m in re.finditer(r"^iter\s+(\d+)/10 \|.*\| lr ([0-9.e+-]+) \|", out, re.M)}
    assert lrs == {9: pytest.approx(_cosine_lr(9, 10), rel=1e-3), 10: pytest.approx(5e-4, rel=1e-3)}, lrs


def test_finetune_loads_the_weights_only(corpus, uninterrupted):
    """Run K: --finetune from A's iteration 8: iteration, samples, optimizer and schedule start fresh
    (steps 1.., the cosine from --lr again), the weights are A's (validation loss at 0 is A's
    at 8, the same model and validation batches)."""
    out, steps, valid = _train(corpus, "--load", uninterrupted["save"], "--finetune", "--train-iters", "2")
    assert "(--finetune): training from iteration 0" in out, out
    assert sorted(steps) == [1, 2] and re.search(r"^iter\s+1/2 \|.*\| lr 2\.750e-03 \|", out, re.M), out
    assert rel_err(valid[0], uninterrupted["valid"][8]) <= 1e-6, (valid[0], uninterrupted["valid"][8])


@pytest.mark.parametrize("when", ["mid-step", "mid-save"])
def test_sigkilled_rank_leaves_no_process_behind(corpus, when):
    """Runs L, M: SIGKILL one rank during a step, or while it writes a checkpoint (saves every step);
    torchrun tears the job down, and not one process of the job (ranks, checkpoint writers, helpers
    of multiprocessing) is left: every descendant of torchrun seen during the run is gone."""
    import threading
    import time

    import psutil

    save = str(corpus["work"] / f"ckpt_kill_{when}")
    extra = ("--save", save, "--save-interval", "1") if when == "mid-save" else ()
    proc = _launch(corpus, "--train-iters", "40", *extra)
    seen, done = {}, threading.Event()

    def watch():  # every process of the job, with its start time (pids are reused)
        while not done.is_set():
            try:
                for p in psutil.Process(proc.pid).children(recursive=True):
                    seen.setdefault(p.pid, (p.create_time(), p.ppid()))
            except psutil.Error:
                pass
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for line in proc.stdout:
            if line.startswith("iter       2/"):
                break
        ranks = psutil.Process(proc.pid).children()
        victim = ranks[0]
        deadline = time.time() + 10
        if when == "mid-save":  # a save is under way once a rank has a child or the iteration folder exists
            while time.time() < deadline and not os.path.isdir(os.path.join(save, "iter_0000003")) and not any(
                    ppid in {r.pid for r in ranks} for _, ppid in seen.values()):
                time.sleep(0.005)
        victim.kill()
        proc.communicate(timeout=120)
    finally:
        done.set()
        watcher.join()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    time.sleep(1)
    alive = []
    for pid, (created, _) in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append((pid, p.cmdline()))
                p.kill()
        except psutil.NoSuchProcess:
            pass
    assert len(seen) >= 2 and not alive, (len(seen), alive)


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
        assert rel_err(resumed[i], steps[i]) <= 1e-6, (i, resumed[i], steps[i])


def test_context_parallel_trains_like_tensor_parallel(corpus, uninterrupted):
    """Run G: CP=2 (each rank holds two of four chunks of every sequence, megatron's layout) from
    scratch: step by step the losses of run A (TP=2), the same model, weights and data sharded
    another way."""
    out, steps, valid = _train(corpus, "--context-parallel-size", "2", tp=1)
    assert "TP=1 PP=1 CP=2 DP=1" in out
    assert sorted(steps) == list(range(1, 9)) and valid[8] < valid[0] - 0.3, valid
    for i, loss in steps.items():
        assert rel_err(loss, uninterrupted["steps"][i]) <= 1e-5, (i, loss, uninterrupted["steps"][i])


def test_ring_context_parallel_trains_like_tensor_parallel(corpus, uninterrupted):
    """Run H: CP=4 with the ring (``--cp-comm-type p2p``) on four ranks from scratch: step by step the
    losses of run A (TP=2)."""
    out, steps, _ = _train(corpus, "--context-parallel-size", "4", "--cp-comm-type", "p2p", tp=1, nproc=4)
    assert "TP=1 PP=1 CP=4 DP=1" in out
    assert sorted(steps) == list(range(1, 9))
    for i, loss in steps.items():
        assert rel_err(loss, uninterrupted["steps"][i]) <= 1e-5, (i, loss, uninterrupted["steps"][i])


def test_layer_input_offload_trains_like_tensor_parallel(corpus, uninterrupted):
    """Run J: A's TP=2 checkpoint at 4 resumed at PP=2 (two micro-batches in flight on the first
    stage) under full recompute with ``--offload-layer-inputs``: steps 5..8 repeat A's. (From scratch
    a PP=2 run initialises its stages with other seeds than A's TP=2 run.)"""
    out, steps, _ = _train(corpus, "--load", uninterrupted["save"], "--ckpt-step", "4",
                           "--pipeline-model-parallel-size", "2", "--offload-layer-inputs",
                           "--recompute-granularity", "full", "--recompute-method", "uniform",
                           "--recompute-num-layers", "1", tp=1)
    assert "TP=1 PP=2 CP=1 DP=1" in out
    assert sorted(steps) == [5, 6, 7, 8]
    for i, loss in steps.items():
        assert rel_err(loss, uninterrupted["steps"][i]) <= 1e-5, (i, loss, uninterrupted["steps"][i])


A_CKPT = "{A}"  # stands for run A's checkpoint root in the rows below


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
        (dict(extra=["--stock-attention", "sdpa"]), r"--stock-attention sdpa chooses the stock model's attention: it "
                                                    r"needs --no-mst"),
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
        # flag values: type, range, divisibility by the parallel sizes
        (dict(extra=["--micro-batch-size", "two"]), r"argument --micro-batch-size: invalid int value: 'two'"),
        (dict(extra=["--lr", "-1"]), r"--lr must be > 0, got -1\.0"),
        (dict(extra=["--adam-beta2", "1.0"]), r"--adam-beta2 must be in \[0, 1\), got 1\.0"),
        (dict(extra=["--hidden-dropout", "2"]), r"--hidden-dropout must be in \[0, 1\], got 2\.0"),
        (dict(extra=["--lr-warmup-iters", "-1"]), r"--lr-warmup-iters must be >= 0, got -1"),
        (dict(extra=["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "161"]),
         r"the model's ffn_hidden_size \(161\) is not divisible by --tensor-model-parallel-size 2"),
        (dict(extra=["--global-batch-size", "6"]), r"--global-batch-size 6 is not divisible by --micro-batch-size"),
        # folders written during work
        (dict(extra=["--save", "/proc/1/ckpt"]), r"--save /proc/1/ckpt: /proc/1 is not writable"),
        (dict(extra=["--tensorboard-dir", "/proc/1/tb"]), r"--tensorboard-dir /proc/1/tb: /proc/1 is not writable"),
        (dict(extra=["--data-cache-path", "/proc/1/cache"]), r"--data-cache-path /proc/1/cache: /proc/1 is not"),
        # --load: what it names, complete, and fitting this run
        (dict(extra=["--load", "/nonexistent/ckpt"]), r"--load /nonexistent/ckpt: no such folder \(to start from "
                                                        r"scratch and save there, give --save the same path\)"),
        (dict(extra=["--load", "{tmp}"]), r"--load \S+ holds no checkpoint \(no latest_checkpointed_iteration"),
        (dict(extra=["--load", A_CKPT, "--ckpt-step", "5"]),
         r"no checkpoint for iteration 5 .* found iterations \[4, 8\]"),
        (dict(extra=["--load", A_CKPT + "/iter_0000004", "--ckpt-step", "8"]),
         r"is the folder of iteration 4 but --ckpt-step is 8"),
        (dict(extra=["--load", "{truncated}"]),
         r"checkpoint file \S+iter_0000008/__0_0\.distcp is truncated \(\d+ of \d+ bytes\); resume an earlier one "
         r"with --ckpt-step 4"),
        (dict(extra=["--load", A_CKPT, "--tensor-model-parallel-size", "2", "--global-batch-size", "8"]),
         r"the checkpoint consumed 32 samples in 8 steps; resume it with its --global-batch-size \(4\)"),
        (dict(extra=["--load", A_CKPT, "--hidden-size", "96"]),
         r"the checkpoint's hidden_size is 64, this run's is 96; pass --hidden-size 64"),
        (dict(extra=["--load", A_CKPT, "--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "300"]),
         r"the checkpoint's vocab_size is 512, this run's is 600; pass --make-vocab-size-divisible-by 256"),
        (dict(extra=["--load", A_CKPT, "--use-distributed-optimizer"]),
         r"saved without --use-distributed-optimizer; resume without it \(or --no-load-optim\)"),
        # the LR schedule: Megatron-LM's rule, one line naming each difference and both ways out
        (dict(extra=["--load", A_CKPT, "--lr", "1e-3", "--lr-decay-style", "constant"]),
         r"schedule differs from the checkpoint's: --lr 0\.001 \(checkpoint: 0\.005\), --lr-decay-style constant "
         r"\(checkpoint: cosine\); pass --override-opt_param-scheduler .* or --use-checkpoint-opt_param-scheduler"),
        (dict(extra=["--load", A_CKPT, "--train-iters", "12"]),  # extending a finished run
         r"--lr-decay-iters 12 \(checkpoint: 8\); pass --override-opt_param-scheduler to continue on this run's "
         r"schedule from the checkpoint's step"),
        (dict(extra=["--load", A_CKPT, "--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"]),
         r"--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other"),
        (dict(extra=["--finetune"]), r"--finetune needs --load"),
        (dict(extra=["--offload-layer-inputs"]), r"--offload-layer-inputs keeps the inputs that full recompute "
                                                  r"stores in host memory: it needs --recompute-granularity full"),
        (dict(extra=["--offload-layer-inputs", "--recompute-granularity", "full", "--recompute-method", "uniform",
                     "--recompute-num-layers", "1"], env={"LOCAL_WORLD_SIZE": "100000000"}),
         r"--offload-layer-inputs needs [0-9.]+ GiB of host memory on this node \(100000000 ranks x 0\.00 GiB"),
    ],
)
def test_bad_input_fails_before_any_work(corpus, uninterrupted, tmp_path, monkeypatch, capsys, change, message):
    """Exit code 2, one line naming the flag, no traceback, torch.distributed never started."""
    import shutil

    import torch.distributed as dist

    from mst_megatron.training import pretrain

    truncated = tmp_path / "truncated"
    if "{truncated}" in change.get("extra", []):
        shutil.copytree(uninterrupted["save"], truncated)
        shard = truncated / "iter_0000008" / "__0_0.distcp"
        os.truncate(shard, os.path.getsize(shard) // 2)
    places = {"{A}": uninterrupted["save"], "{tmp}": str(tmp_path), "{truncated}": str(truncated)}
    extra = [next((w.replace(k, v) for k, v in places.items() if k in w), w) for w in change.get("extra", [])]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name, value in change.get("env", {}).items():
        monkeypatch.setenv(name, value)
    argv = ["--tokenizer-model", corpus[change.get("tokenizer", "tokenizer")],
            "--data-path", *change.get("data", [corpus["code"]]), *MODEL, *RUN, *extra]
    try:
        code = pretrain.main(argv, CONFIGS)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
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
