"""Counting the matrix products and FLOPs a step computes, on real or fake tensors.

:class:`GemmLog` records every matrix product actually computed (not those
:class:`~mst_megatron.ops.mini_sequence.GemmsLeftEmpty` skips); :func:`count_flops` is torch's
``FlopCounterMode`` plus the CPU flash-attention kernels, by default halved for causal attention.
Only matrix products and attention count (docs/design.md#measurement).
"""

from typing import Callable, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["GemmLog", "count_flops", "ATTENTION_COUNTS"]

aten = torch.ops.aten



ATTENTION_COUNTS = ("causal", "dense", "none")


def _flash_mapping(attention: str) -> dict:
    """``custom_mapping`` for the CPU flash kernels: torch's SDPA formulas (the counter hands them
    shapes), halved for causal calls under ``"causal"`` (a flash kernel skips the masked blocks),
    dense under ``"dense"``; ``"none"`` leaves them uncounted (torch's own ``FlopCounterMode``)."""
    if attention not in ATTENTION_COUNTS:
        raise ValueError(f"attention must be one of {ATTENTION_COUNTS}, got {attention!r}")
    if attention == "none":
        return {}

    def share(is_causal: bool) -> int:
        return 2 if is_causal and attention == "causal" else 1

    def forward(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value) // share(is_causal)

    def backward(grad_out, query, key, value, out, lse, dropout_p=0.0, is_causal=False, *args,
                 out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value) // share(is_causal)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


_MM = {aten.mm.default, aten.mm.out}
_ADDMM = {aten.addmm.default, aten.addmm_.default, aten.addmm.out}
_BMM = {aten.bmm.default, aten.bmm.out}
_BADDBMM = {aten.baddbmm.default, aten.baddbmm_.default, aten.baddbmm.out}


class GemmLog(TorchDispatchMode):
    """Inside it, ``self.gemms`` collects ``(m, k, n)`` for every ``mm``/``addmm`` computed (an
    ``[m, k] @ [k, n]`` product; ``out=`` and in-place forms too) and ``(batch * m, k, n)`` for every
    ``bmm``/``baddbmm``."""

    def __init__(self):
        super().__init__()
        self.gemms: List[Tuple[int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MM or func in _ADDMM:
            a, b = args[:2] if func in _MM else args[1:3]
            self.gemms.append((a.shape[0], a.shape[1], b.shape[1]))
        elif func in _BMM or func in _BADDBMM:
            a, b = args[:2] if func in _BMM else args[1:3]
            self.gemms.append((a.shape[0] * a.shape[1], a.shape[2], b.shape[2]))
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return len(self.gemms)

    def flops(self, keep: Callable[[Tuple[int, int, int]], bool] = lambda mkn: True) -> int:
        """``2 m k n`` summed over the recorded products for which ``keep((m, k, n))`` holds."""
        return sum(2 * m * k * n for m, k, n in self.gemms if keep((m, k, n)))


def count_flops(step: Callable[[], None], attention: str = "causal") -> Tuple[int, Dict[str, int]]:
    """Run ``step()`` under ``FlopCounterMode``; return (total FLOPs, FLOPs by module name).
    ``attention``: how the CPU flash-attention kernels count, one of :data:`ATTENTION_COUNTS`."""
    with FlopCounterMode(display=False, custom_mapping=_flash_mapping(attention)) as counter:
        step()
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), by_module
