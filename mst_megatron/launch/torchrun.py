"""The multi-node ``torchrun`` command for an MST job, from flags or the scheduler's environment.

One launcher runs per node (``srun --ntasks-per-node=1`` under SLURM, one pod per node under a
Kubernetes PyTorchJob, or by hand on each host). Every node computes the same command: node count,
GPUs per node, and a c10d rendezvous on the first host, so no node needs a rank of its own (the
rendezvous assigns them). Values come from, in order: the flags, then the scheduler's variables:

* SLURM: ``SLURM_JOB_NUM_NODES``, ``SLURM_GPUS_ON_NODE``, the first host of ``SLURM_JOB_NODELIST``,
  ``SLURM_JOB_ID`` as the rendezvous id;
* Kubernetes (Kubeflow's torch jobs): ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_MASTER_ADDR``
  (or the operator's ``MASTER_ADDR``);
* the rendezvous port: ``PET_MASTER_PORT`` / ``MASTER_PORT``, else 29500.

Before anything starts, the training flags' TP/PP/CP are checked against the cluster's shape
(:meth:`mst_megatron.layout.ParallelLayout.for_cluster`). ``--dry-run`` (or ``MST_DRY_RUN=1``), wherever it
stands on the command line, prints the command instead of running it; otherwise the launcher
replaces itself with torchrun, so the scheduler's signals reach torchrun directly.
"""

import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

from mst_megatron.launch import LaunchError
from mst_megatron.layout import CP, PP, TP, LayoutError, ParallelLayout

SCHEDULERS = ("auto", "slurm", "k8s", "none")
DEFAULT_PORT = 29500
_PARALLEL_FLAGS = {"tp": TP, "pp": PP, "cp": CP}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[003-006,009],login1`` -> ``gpu003``."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    head = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end]).strip()
    if not head or "[" in head or "]" in head:
        raise LaunchError(f"SLURM_JOB_NODELIST {nodelist!r} is not a SLURM host list")
    return head


def detect_scheduler(env: Mapping[str, str]) -> str:
    """``slurm`` inside a SLURM job, ``k8s`` in a Kubeflow torch job pod, else ``none``."""
    if "SLURM_JOB_ID" in env:
        return "slurm"
    if "PET_NNODES" in env or "PET_MASTER_ADDR" in env:
        return "k8s"
    return "none"


def _scheduler_values(scheduler: str, env: Mapping[str, str]) -> Dict[str, Optional[str]]:
    """What the scheduler's environment says (None where it says nothing)."""
    port = env.get("PET_MASTER_PORT") or env.get("MASTER_PORT")
    if scheduler == "slurm":
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        return dict(nnodes=env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES"),
                    nproc_per_node=env.get("SLURM_GPUS_ON_NODE"),
                    host=first_host(nodelist) if nodelist else None, port=port, rdzv_id=env.get("SLURM_JOB_ID"))
    if scheduler == "k8s":
        return dict(nnodes=env.get("PET_NNODES"), nproc_per_node=env.get("PET_NPROC_PER_NODE"),
                    host=env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR"), port=port, rdzv_id=None)
    return dict(nnodes=None, nproc_per_node=None, host=None, port=port, rdzv_id=None)


_SOURCES = {  # where each value can come from, for the error messages
    "slurm": {"nnodes": "SLURM_JOB_NUM_NODES", "nproc_per_node": "SLURM_GPUS_ON_NODE (request --gpus-per-node)",
              "host": "SLURM_JOB_NODELIST"},
    "k8s": {"nnodes": "PET_NNODES", "nproc_per_node": "PET_NPROC_PER_NODE", "host": "PET_MASTER_ADDR or MASTER_ADDR"},
}


def _positive(value: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise LaunchError(f"{name} must be an int >= 1, got {value!r}") from None
    if number < 1:
        raise LaunchError(f"{name} must be an int >= 1, got {number}")
    return number


def parallel_sizes(train_args: List[str]) -> Dict[str, int]:
    """TP/PP/CP from the training flags (``--flag N`` or ``--flag=N``), 1 when absent."""
    sizes = {}
    for key, flag in _PARALLEL_FLAGS.items():
        value = "1"
        for i, arg in enumerate(train_args):
            if arg == flag:
                if i + 1 >= len(train_args):
                    raise LaunchError(f"{flag} needs a value")
                value = train_args[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
        sizes[key] = _positive(value, flag)
    return sizes


@dataclass
class Launch:
    """A resolved launch: torchrun's settings and the training command."""

    nnodes: int
    nproc_per_node: int
    rdzv_endpoint: Optional[str]  # None: one node, torchrun --standalone
    rdzv_id: str
    script: str
    script_args: List[str]
    max_restarts: int = 0

    def command(self) -> List[str]:
        """``python -m torch.distributed.run ...``: torchrun of this very Python environment."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.nnodes),
               "--nproc-per-node", str(self.nproc_per_node)]
        if self.rdzv_endpoint is None:
            cmd += ["--standalone"]
        else:
            cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", self.rdzv_endpoint, "--rdzv-id", self.rdzv_id]
        return cmd + ["--max-restarts", str(self.max_restarts), self.script, *self.script_args]


def resolve(args: argparse.Namespace, env: Mapping[str, str]) -> Launch:
    """Combine flags and the scheduler's environment; check everything before anything starts."""
    scheduler = detect_scheduler(env) if args.scheduler == "auto" else args.scheduler
    found = _scheduler_values(scheduler, env)
    sources = _SOURCES.get(scheduler, {})

    def pick(key: str, flag: str) -> Optional[str]:
        value = getattr(args, key)
        if value is not None:
            return str(value)
        if found[key] is None and key in sources:
            raise LaunchError(f"{flag} is missing: pass it, or set {sources[key]} (scheduler {scheduler})")
        return found[key]

    nnodes = pick("nnodes", "--nnodes")
    nproc = pick("nproc_per_node", "--nproc-per-node")
    if nnodes is None or nproc is None:
        missing = " and ".join(f for f, v in (("--nnodes", nnodes), ("--nproc-per-node", nproc)) if v is None)
        raise LaunchError(f"{missing} missing: pass them, or run under SLURM or a Kubernetes PyTorchJob")
    nnodes, nproc = _positive(nnodes, "--nnodes"), _positive(nproc, "--nproc-per-node")

    endpoint = args.rdzv_endpoint
    if endpoint is None and (found["host"] is not None or nnodes > 1):
        host = found["host"]
        if host is None:
            hint = f" or set {sources['host']}" if "host" in sources else ""
            raise LaunchError(f"missing rendezvous address for {nnodes} nodes: pass --rdzv-endpoint HOST[:PORT]{hint}")
        endpoint = host
    if endpoint is not None and ":" not in endpoint:
        endpoint = f"{endpoint}:{_positive(found['port'] or str(DEFAULT_PORT), 'the rendezvous port')}"
    ParallelLayout.for_cluster(nnodes, nproc, **parallel_sizes(args.script_args))
    rdzv_id = args.rdzv_id or found["rdzv_id"] or "mst"
    return Launch(nnodes, nproc, endpoint, rdzv_id, args.script, args.script_args, args.max_restarts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun_multinode.sh",
        description="Start one node of a multi-node MST job with torchrun (c10d rendezvous on the first host). "
                    "Unset values come from the scheduler's environment (SLURM or a Kubernetes PyTorchJob).",
    )
    p.add_argument("--nnodes", type=int, default=None, help="node count (SLURM_JOB_NUM_NODES, PET_NNODES)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes (GPUs) per node (SLURM_GPUS_ON_NODE, PET_NPROC_PER_NODE)")
    p.add_argument("--rdzv-endpoint", default=None,
                   help="HOST[:PORT] of the rendezvous (first host of SLURM_JOB_NODELIST, PET_MASTER_ADDR/MASTER_ADDR; "
                        f"port MASTER_PORT or {DEFAULT_PORT})")
    p.add_argument("--rdzv-id", default=None, help="rendezvous id, the same on every node (SLURM_JOB_ID, else 'mst')")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="auto", help="whose environment to read")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun's worker-group restarts")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command instead of running it, wherever it stands (or MST_DRY_RUN=1)")
    p.add_argument("script", help="training script, e.g. examples/pretrain_gpt_mst.py")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its flags")
    return p


def main(argv: Optional[List[str]] = None, env: Optional[Mapping[str, str]] = None) -> int:
    """CLI entry: print the command (dry run) or exec it; 2 with a one-line message on bad input."""
    env = os.environ if env is None else env
    argv = sys.argv[1:] if argv is None else list(argv)
    # --dry-run wherever it stands, also among the training flags (none of them is called that):
    # after the script path argparse would hand it to the script, and torchrun would start.
    dry_run = "--dry-run" in argv or env.get("MST_DRY_RUN") == "1"
    args = build_parser().parse_args([a for a in argv if a != "--dry-run"])
    try:
        launch = resolve(args, env)
    except (LaunchError, LayoutError) as e:
        print(f"torchrun_multinode.sh: error: {e}", file=sys.stderr)
        return 2
    command = launch.command()
    print(shlex.join(command), flush=True)
    if dry_run:
        return 0
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
