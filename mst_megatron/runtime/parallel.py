"""Start and stop torch.distributed and megatron-core's model-parallel state, on GPU or CPU.

Under ``torchrun`` the rank and world size come from its environment; with no such environment the
process runs as a one-rank world. NCCL and one GPU per local rank when CUDA is present; gloo and the
CPU compatibility layer (:mod:`mst_megatron.runtime.cpu_compat`) otherwise.
"""

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from mst_megatron.runtime import cpu_compat
from mst_megatron.runtime.quiet import import_megatron_quietly


def _check_sizes(world_size: int, tp: int, pp: int, cp: int, vpp: Optional[int]) -> None:
    sizes = dict(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
    )
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}) x context_parallel_size ({cp}) = {model_parallel}"
        )
    if vpp is not None:
        if isinstance(vpp, bool) or not isinstance(vpp, int) or vpp < 1:
            raise ValueError(f"virtual_pipeline_model_parallel_size must be None or an int >= 1, got {vpp!r}")
        if pp == 1 and vpp > 1:
            raise ValueError(
                "virtual_pipeline_model_parallel_size > 1 needs pipeline_model_parallel_size > 1, "
                f"got virtual {vpp} with pipeline_model_parallel_size 1"
            )


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
    cpu_bridges: Optional[bool] = None,
) -> Optional[cpu_compat.CpuBridges]:
    """Start torch.distributed and megatron-core's parallel state; seed the model-parallel RNGs.

    The world size must be divisible by TP x PP x CP; the remaining factor is data parallelism.
    ``cpu_bridges``: install megatron-core's CPU bridges (:mod:`mst_megatron.runtime.cpu_compat`);
    None (default) installs them exactly when CUDA is absent, False never (megatron-core then fails at
    its first CUDA call on a CPU-only machine), True requires a CUDA-less machine. Returns the
    bridges' handle (its ``restore()`` removes them) or None.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
    _check_sizes(
        world_size,
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        context_parallel_size,
        virtual_pipeline_model_parallel_size,
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
