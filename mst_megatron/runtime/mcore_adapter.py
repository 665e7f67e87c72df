"""The megatron-core version adapter: every call whose form differs between the supported versions.

Supported: megatron-core 0.16.1 up to 0.19.x (``pyproject.toml``). Each function below names the
megatron call it adapts and the versions that differ; nothing else in the package tests versions.
"""

import inspect
from typing import Any, Dict, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.mlp import MLP
from megatron.core.utils import get_batch_on_this_cp_rank as _get_batch_on_this_cp_rank

__all__ = ["MLP_TAKES_NAME", "batch_on_this_cp_rank"]

# ``MLP.__init__(..., name=...)``: 0.19 passes the module's name top-down; 0.16 has no such argument.
MLP_TAKES_NAME = "name" in inspect.signature(MLP.__init__).parameters

_CP_SPLIT_TAKES_HYBRID = "is_hybrid_cp" in inspect.signature(_get_batch_on_this_cp_rank).parameters


def batch_on_this_cp_rank(
    batch: Dict[str, Any], cp_group: Optional[torch.distributed.ProcessGroup] = None
) -> Dict[str, Any]:
    """This CP rank's part of ``batch`` (tensors ``[b, s, ...]``), megatron's load-balanced layout.

    Adapts ``megatron.core.utils.get_batch_on_this_cp_rank``: 0.16 takes ``(batch, cp_group=None)``
    and falls back to parallel_state's CP group; 0.19 takes ``(batch, is_hybrid_cp, cp_group=None)``
    and with no group splits over the whole world, so the CP group is always passed here.
    """
    cp_group = parallel_state.get_context_parallel_group() if cp_group is None else cp_group
    if _CP_SPLIT_TAKES_HYBRID:
        return _get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)
    return _get_batch_on_this_cp_rank(batch, cp_group=cp_group)
