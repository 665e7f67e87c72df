"""Start and stop torch.distributed and megatron-core's model-parallel state, on GPU or CPU.

Under ``torchrun`` the rank and world size come from its environment; with no such environment the
process runs as a one-rank world. NCCL and one GPU per local rank when CUDA is present; gloo and the
CPU compatibility layer (:mod:`mst_megatron.runtime.cpu_compat`) otherwise.
"""

import os
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist

from mst_megatron.layout import ParallelLayout
from mst_megatron.runtime import cpu_compat
from mst_megatron.runtime.quiet import import_megatron_quietly


def _start_process_group() -> None:
    """torchrun's world when its environment is set, else a one-rank world on a free loopback port
    (the environment is left as it is)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(minutes=10)
    if "WORLD_SIZE" not in os.environ:
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                world_size=1, timeout=timeout)
        return
    if "MASTER_PORT" not in os.environ:
        raise RuntimeError("WORLD_SIZE is set but MASTER_PORT is not: launch multi-rank jobs with torchrun")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    seed: int = 1234,
    hierarchical_context_parallel_sizes: Optional[List[int]] = None,
    cpu_bridges: Optional[bool] = None,
) -> Optional[cpu_compat.CpuBridges]:
    """Start torch.distributed and megatron-core's parallel state; seed the model-parallel RNGs.

    The sizes must form a :class:`~mst_megatron.layout.ParallelLayout` of the world (else
    :class:`~mst_megatron.layout.LayoutError`); the remaining factor is data parallelism.
    ``hierarchical_context_parallel_sizes`` ``[all-to-all, ring]`` (product CP) makes megatron's
    hierarchical CP groups, which ``cp_comm_type="a2a+p2p"`` uses.
    ``cpu_bridges``: install megatron-core's CPU bridges (:mod:`mst_megatron.runtime.cpu_compat`);
    None (default) installs them exactly when CUDA is absent, False never (megatron-core then fails at
    its first CUDA call on a CPU-only machine), True requires a CUDA-less machine. Returns the
    bridges' handle (its ``restore()`` removes them) or None.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    hierarchical = hierarchical_context_parallel_sizes
    ParallelLayout.for_world(
        world_size, tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size,
        vpp=virtual_pipeline_model_parallel_size, cp_comm_type="a2a" if hierarchical is None else "a2a+p2p",
        hierarchical_cp_sizes=None if hierarchical is None else tuple(hierarchical),
    )
    if cpu_bridges not in (None, True, False):
        raise ValueError(f"cpu_bridges must be None, True or False, got {cpu_bridges!r}")
    import_megatron_quietly()
    bridges = None
    if cpu_bridges or (cpu_bridges is None and not torch.cuda.is_available()):
        bridges = cpu_compat.install()
    _start_process_group()

    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        hierarchical_context_parallel_sizes=hierarchical_context_parallel_sizes,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return bridges


def destroy_parallel() -> None:
    """Tear down megatron-core's parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
