"""What the tests share: the repository root, one error metric and one op-watching dispatch mode.

Builders live in the submodules: :mod:`.models` (tiny megatron models), :mod:`.training` (batches,
megatron's schedule, gradients), :mod:`.multirank` (gloo ranks), :mod:`.corpus` (tokenizer and
indexed data built by the project's scripts), :mod:`.layer_compare` (the layer-spec comparison),
:mod:`.cross_entropy` (inputs and reference of the head op).
"""

import os

import torch

from mst_megatron.measure.flops import GemmLog

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "examples", "configs")

_aten = torch.ops.aten
HOST_SYNCS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default}


def rel_err(actual, expected) -> float:
    """Max abs error relative to the reference's max abs value (tensors or numbers, in float64)."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


class OpLog(GemmLog):
    """:class:`~mst_megatron.measure.flops.GemmLog` that also records host syncs (``syncs``: the ops
    that read device values on the host) and, given ``width``, the shape of every non-view output whose
    last dim is ``width`` (``shapes``; ``rows``: the most ``numel // width`` among them, e.g. the
    logits rows alive at once)."""

    def __init__(self, width: int = 0):
        super().__init__()
        self.width, self.shapes, self.syncs = width, [], []

    @property
    def rows(self) -> int:
        return max((s.numel() for s in self.shapes), default=0) // max(self.width, 1)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func in HOST_SYNCS:
            self.syncs.append(func)
        if self.width and not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.width:
                    self.shapes.append(t.shape)
        return out
