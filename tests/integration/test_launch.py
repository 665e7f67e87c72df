"""Multi-node launch: two torchrun "nodes" on localhost training through the project's launcher
(PP=2 spanning both), the launcher's resolution from flags / SLURM / PyTorchJob environments and its
errors, the SLURM batch files under a simulated SLURM environment (dry run), and the Kubernetes
manifest."""

import os
import re
import shlex
import signal
import subprocess
import sys

import pytest

from tests.helpers.corpus import MODEL, SCRIPT
from tests.helpers.multirank import free_port

from tests.helpers import ROOT

LAUNCHER = os.path.join(ROOT, "cluster", "torchrun_multinode.sh")
SLURM_DIR = os.path.join(ROOT, "cluster", "slurm")
MANIFEST = os.path.join(ROOT, "cluster", "k8s", "llama3-8b-1m-pytorchjob.yaml")
STEP = re.compile(r"^iter\s+(\d+)/3 \| loss ([0-9.]+)", re.M)


def _resolve(argv, env):
    from mst_megatron.launch import torchrun

    return torchrun.resolve(torchrun.build_parser().parse_args(argv), env)


def _torchrun_args(line):
    """The torchrun options of a printed command, as a dict, and the training flags after the script."""
    words = shlex.split(line)
    assert words[1:3] == ["-m", "torch.distributed.run"], line
    script = next(i for i, w in enumerate(words) if w.endswith("pretrain_gpt_mst.py"))
    options = dict(zip(words[3:script:2], words[4:script:2]))
    return options, words[script + 1:]


def _flag(train_args, name):
    return train_args[train_args.index(name) + 1]


def test_two_nodes_on_localhost_train_with_pipeline_across_nodes(corpus):
    """Two launcher agents (--nnodes 2, one process each, c10d rendezvous on 127.0.0.1): the two
    pipeline stages of the tiny model live on different "nodes" and train 3 steps."""
    import psutil

    port = free_port()
    train = [SCRIPT, "--tokenizer-model", corpus["tokenizer"], "--data-path", corpus["code"], *MODEL,
             "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
             "--eval-interval", "3", "--eval-iters", "1", "--split", "90,10,0", "--pipeline-model-parallel-size", "2"]
    cmd = ["bash", LAUNCHER, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", "two-nodes", *train]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        outs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:  # timed out or failed: leave no agent or worker behind
            if node.poll() is None:
                for child in psutil.Process(node.pid).children(recursive=True):
                    child.kill()
                os.killpg(node.pid, signal.SIGKILL)
    for node, out in zip(nodes, outs):
        assert node.returncode == 0, out
        options, _ = _torchrun_args(out.splitlines()[0])
        assert options["--nnodes"] == "2" and options["--rdzv-backend"] == "c10d", out
    logs = "".join(outs)
    assert "TP=1 PP=2" in logs and "DP=1" in logs, logs
    assert sorted(int(m[0]) for m in STEP.findall(logs)) == [1, 2, 3], logs


@pytest.mark.parametrize("nodelist, host", [("gpu[003-006,009],login1", "gpu003"), ("dgx-a7", "dgx-a7"),
                                            ("rack[2-3]-n[01-04]", "rack2-n01"), ("a,b[1-2]", "a")])
def test_first_host_of_slurm_node_lists(nodelist, host):
    from mst_megatron.launch.torchrun import first_host

    assert first_host(nodelist) == host


def test_resolution_from_flags_slurm_and_pytorchjob():
    slurm = dict(SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="4", SLURM_JOB_NODELIST="gpu[012-015]",
                 SLURM_GPUS_ON_NODE="8", MASTER_PORT="6000")
    launch = _resolve(["x.py", "--tensor-model-parallel-size", "8", "--context-parallel-size=2"], slurm)
    assert (launch.nnodes, launch.nproc_per_node, launch.rdzv_endpoint, launch.rdzv_id) == (4, 8, "gpu012:6000", "77")
    # flags win over the environment
    launch = _resolve(["--nnodes", "2", "--rdzv-endpoint", "10.0.0.1:1234", "x.py"], slurm)
    assert (launch.nnodes, launch.rdzv_endpoint) == (2, "10.0.0.1:1234")
    k8s = dict(PET_NNODES="4", PET_NPROC_PER_NODE="8", MASTER_ADDR="job-master-0", MASTER_PORT="29500")
    launch = _resolve(["x.py"], k8s)
    assert (launch.nnodes, launch.nproc_per_node, launch.rdzv_endpoint, launch.rdzv_id) == (4, 8, "job-master-0:29500",
                                                                                           "mst")
    # one node without a rendezvous host: torchrun --standalone
    assert "--standalone" in _resolve(["--nnodes", "1", "--nproc-per-node", "2", "x.py"], {}).command()


@pytest.mark.parametrize("argv, env, message", [
    (["--nnodes", "2", "--nproc-per-node", "1", "x.py"], {}, r"missing rendezvous address for 2 nodes: pass --rdzv"),
    (["x.py"], dict(SLURM_JOB_ID="1", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8"),
     r"missing rendezvous address for 2 nodes: .* or set SLURM_JOB_NODELIST"),
    (["x.py"], dict(SLURM_JOB_ID="1", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="a,b"),
     r"--nproc-per-node is missing: pass it, or set SLURM_GPUS_ON_NODE"),
    (["x.py"], {}, r"--nnodes and --nproc-per-node missing: pass them, or run under SLURM or a Kubernetes"),
    (["--nnodes", "3", "--nproc-per-node", "8", "--rdzv-endpoint", "h", "x.py", "--tensor-model-parallel-size", "8",
      "--pipeline-model-parallel-size", "2"], {}, r"3 nodes x 8 GPUs = 24 GPUs is not divisible by .* = 16"),
    (["--nnodes", "2", "--nproc-per-node", "4", "--rdzv-endpoint", "h", "x.py", "--tensor-model-parallel-size", "8"],
     {}, r"--tensor-model-parallel-size 8 must divide the 4 GPUs per node: .* use one of \[1, 2, 4\]"),
    (["--nnodes", "1", "--nproc-per-node", "1", "x.py", "--context-parallel-size=two"], {},
     r"--context-parallel-size must be an int >= 1, got 'two'"),
])
def test_bad_launch_input(argv, env, message):
    from mst_megatron.launch import LaunchError
    from mst_megatron.layout import LayoutError

    with pytest.raises((LaunchError, LayoutError), match=message):
        _resolve(argv, env)


def _run(cmd, env, cwd=ROOT):
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHON": sys.executable}
    return subprocess.run(cmd, cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=120)


SLURM_ENV = dict(SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="8",
                 DATA_PATH="0.7 /data/a 0.3 /data/b", TOKENIZER_MODEL="/data/tok.model")


@pytest.mark.parametrize("batch_file, nodes, nodelist, layout, override, seq", [
    ("llama3-8b-128k-1node.sbatch", "1", "dgx01", dict(TP="2", PP="1", CP="1"), {}, "131072"),
    ("llama3-8b-1m-multinode.sbatch", "4", "gpu[012-015]", dict(TP="8", PP="1", CP="2"), {}, "1048576"),
    ("llama3-8b-1m-multinode.sbatch", "4", "gpu[012-015]", dict(TP="8", PP="2", CP="2"), dict(PP="2"), "1048576"),
    # TP x CP = 64 ranks per sequence, past Llama-3-8B's 32 heads: the ring
    ("llama3-8b-1m-multinode.sbatch", "8", "gpu[012-019]", dict(TP="8", PP="1", CP="8"), dict(CP="8"), "1048576"),
])
def test_slurm_batch_files_dry_run(tmp_path, batch_file, nodes, nodelist, layout, override, seq):
    """sbatch runs the file from its spool copy: run it from elsewhere, as SLURM would."""
    env = dict(SLURM_ENV, SLURM_JOB_NUM_NODES=nodes, SLURM_JOB_NODELIST=nodelist, **override)
    result = _run(["bash", os.path.join(SLURM_DIR, batch_file), "--dry-run"], env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["srun command"] == (f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "
                                     f"{ROOT}/cluster/train_llama3_8b_long.sh --scheduler slurm")
    options, train = _torchrun_args(lines["torchrun command on every node"])
    assert options == {"--nnodes": nodes, "--nproc-per-node": "8", "--rdzv-backend": "c10d",
                       "--rdzv-endpoint": f"{nodelist.replace('[', '').split('-')[0]}:29500",
                       "--rdzv-id": "4242", "--max-restarts": "0"}
    for key, flag in (("TP", "--tensor-model-parallel-size"), ("PP", "--pipeline-model-parallel-size"),
                      ("CP", "--context-parallel-size")):
        assert _flag(train, flag) == layout[key]
    assert _flag(train, "--seq-length") == seq == _flag(train, "--max-position-embeddings")
    assert _flag(train, "--cp-comm-type") == ("a2a" if int(layout["TP"]) * int(layout["CP"]) <= 32 else "p2p")
    assert _flag(train, "--model-config") == "llama3-8b" and "--sequence-parallel" in train
    assert train[train.index("--data-path") + 1:train.index("--tokenizer-model")] == ["0.7", "/data/a", "0.3", "/data/b"]
    assert _flag(train, "--mlp-mini-sequences") == "auto" and "--bf16" in train


@pytest.mark.parametrize("drop, change, message", [
    ("DATA_PATH", {}, r"DATA_PATH is not set \(required: SEQ_LENGTH TP PP CP DATA_PATH TOKENIZER_MODEL\)"),
    ("SLURM_JOB_NODELIST", {}, r"missing rendezvous address for 4 nodes: .* or set SLURM_JOB_NODELIST"),
    ("SLURM_GPUS_ON_NODE", {}, r"--nproc-per-node is missing: pass it, or set SLURM_GPUS_ON_NODE"),
    (None, dict(SLURM_JOB_NUM_NODES="3"), r"3 nodes x 8 GPUs = 24 GPUs is not divisible by .* = 16"),
])
def test_slurm_batch_file_fails_early_on_missing_variables(drop, change, message):
    env = {**SLURM_ENV, "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[012-015]", **change}
    env.pop(drop, None)
    result = _run(["bash", os.path.join(SLURM_DIR, "llama3-8b-1m-multinode.sbatch"), "--dry-run"], env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert "srun command" not in result.stdout


def test_kubernetes_manifest():
    """What the training operator needs, and the command each pod runs (dry run, operator's env)."""
    import yaml

    with open(MANIFEST) as f:
        job = yaml.safe_load(f)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    pod = replicas["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["image"]
    assert {"name": "pytorchjob-port", "containerPort": 29500} in container["ports"]
    command = container["command"]
    nnodes, nproc = int(_flag(command, "--nnodes")), int(_flag(command, "--nproc-per-node"))
    assert replicas["Master"]["replicas"] + replicas["Worker"]["replicas"] == nnodes
    assert container["resources"]["limits"]["nvidia.com/gpu"] == nproc
    env = {e["name"]: e["value"] for e in container["env"]}
    assert {"SEQ_LENGTH", "TP", "PP", "CP", "DATA_PATH", "TOKENIZER_MODEL"} <= set(env)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["shm"] == "/dev/shm" and any(v["name"] == "shm" and v["emptyDir"]["medium"] == "Memory"
                                               for v in pod["volumes"])

    operator = dict(MASTER_ADDR="mst-llama3-8b-1m-master-0", MASTER_PORT="29500", PET_NPROC_PER_NODE=str(nproc))
    result = _run(command, {**env, **operator, "MST_DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    options, train = _torchrun_args(result.stdout.strip())
    assert options["--nnodes"] == str(nnodes) and options["--nproc-per-node"] == str(nproc)
    assert options["--rdzv-endpoint"] == "mst-llama3-8b-1m-master-0:29500"
    assert _flag(train, "--context-parallel-size") == env["CP"] and _flag(train, "--seq-length") == env["SEQ_LENGTH"]


def _documented_invocations():
    """Every launch command the docs show (README.md, cluster/README.md, the launch files' comments),
    continuation lines joined, once each: (where, environment assignments, words)."""
    found = []
    for doc in ("README.md", "cluster/README.md", *(f"cluster/slurm/{f}" for f in sorted(os.listdir(SLURM_DIR))),
                "cluster/torchrun_multinode.sh"):
        with open(os.path.join(ROOT, doc)) as f:
            text = re.sub(r"\\\n#?\s*", " ", f.read())
        for line in text.splitlines():
            match = re.search(r"((?:[A-Z_]+=\S+ )*)(?:bash|sbatch) (cluster/\S+)(.*)", line.lstrip("# "))
            if match:
                rest = re.sub(r"\[--dry-run\]|\.\.\.|#.*|--dry-run", "", match[3]).split()
                env = dict(word.split("=", 1) for word in match[1].split())
                if all((env, [match[2], *rest]) != (e, w) for _, e, w in found):
                    found.append((doc, env, [match[2], *rest]))
    return found


def test_docs_show_launch_commands():
    files = {words[0] for _, _, words in _documented_invocations()}
    assert {"cluster/torchrun_multinode.sh", "cluster/slurm/llama3-8b-1m-multinode.sbatch",
            "cluster/slurm/llama3-8b-128k-1node.sbatch"} <= files, files


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("doc, env, words", _documented_invocations(), ids=lambda x: x if isinstance(x, str) else None)
def test_documented_invocations_dry_run_never_launch(tmp_path, where, doc, env, words):
    """--dry-run first or last on a documented command line: the command is printed, and neither
    torchrun (the interpreter's torch.distributed.run, or a torchrun on PATH) nor srun is called."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    marker = tmp_path / "launched"
    for name in ("torchrun", "srun"):
        (fakes / name).write_text(f"#!/bin/sh\necho {name} >> {marker}\nexit 97\n")
    (fakes / "python").write_text(  # the launcher runs torchrun as `$PYTHON -m torch.distributed.run`
        f'#!/bin/sh\ncase "$*" in *torch.distributed.run*) echo torchrun >> {marker}; exit 97;; esac\n'
        f'exec {sys.executable} "$@"\n')
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    argv = [words[0], "--dry-run", *words[1:]] if where == "first" else [*words, "--dry-run"]
    slurm = dict(SLURM_ENV, SLURM_JOB_NUM_NODES="4", SLURM_JOB_NODELIST="gpu[012-015]") if ".sbatch" in words[0] else {}
    result = _run(["bash", *argv], {**slurm, **env, "PATH": f"{fakes}:{os.environ['PATH']}",
                                    "PYTHON": str(fakes / "python")})
    assert not marker.exists(), (doc, argv, marker.read_text(), result.stdout, result.stderr)
    assert result.returncode == 0, (doc, argv, result.stdout, result.stderr)
    assert "torch.distributed.run" in result.stdout, result.stdout
