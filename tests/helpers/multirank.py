"""Run a test body on N gloo ranks on this machine.

Each rank is a fresh spawned process with torchrun's environment variables set (so code under test
starts ``torch.distributed`` exactly as it would under ``torchrun``). The first failing rank's
traceback is raised in the parent; every child is killed on timeout or failure, none is left behind.
"""

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable

DEFAULT_TIMEOUT_S = 300


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, args, kwargs, errors):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # Two ranks on two cores: one intra-op thread each keeps them from starving one another.
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        fn(*args, **kwargs)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while a peer still uses it (that can abort the process)
    except BaseException:  # noqa: BLE001 - the parent reports it
        errors.put((rank, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: float = DEFAULT_TIMEOUT_S, **kwargs):
    """Call ``fn(*args, **kwargs)`` on ``world_size`` ranks; raise with the failing rank's traceback.

    ``fn`` must be importable (module level) because ranks are spawned, not forked. The body starts
    the process group itself (normally through ``mst_megatron.init_parallel``), reading
    RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as under torchrun.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, args, kwargs, errors))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
            if p.is_alive():
                raise TimeoutError(f"rank {procs.index(p)} of {world_size} still running after {timeout}s")
            if p.exitcode != 0 and not errors.empty():
                break  # a rank failed; the others may be blocked in a collective
        if not errors.empty():
            rank, tb = errors.get()
            raise AssertionError(f"rank {rank} of {world_size} failed:\n{tb}")
        bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise AssertionError(f"ranks exited abnormally (rank, exitcode): {bad}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
