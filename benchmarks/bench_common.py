"""What every single-process benchmark here does first: thread count, a one-rank world, the machine."""

import os
import platform
from typing import Dict, Optional

import torch


def machine() -> Dict:
    """The CPU model, core count, memory and software versions, for the JSON report."""
    model = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    return dict(cpu=model, logical_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def start_one_rank(threads: Optional[int]) -> Dict:
    """Set torch's intra-op threads (None or 0: torch's default), start a one-rank megatron world
    (``mst_megatron.destroy_parallel()`` ends it) and return :func:`machine`."""
    import mst_megatron

    if threads:
        torch.set_num_threads(threads)
    mst_megatron.init_parallel()
    return machine()
