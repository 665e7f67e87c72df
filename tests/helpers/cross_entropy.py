"""Inputs and the full-logits reference of the LM-head cross-entropy op, for its unit and rank tests."""

import torch
import torch.nn.functional as F

from mst_megatron.ops.linear_cross_entropy import linear_cross_entropy

def make_inputs(T, V, h, dtype=torch.float32, seed=0):
    """hidden, weight, labels and a non-uniform upstream gradient with some zeros (a loss mask)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, h, generator=g).to(dtype)
    weight = (torch.randn(V, h, generator=g) / h**0.5).to(dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    return hidden, weight, labels, upstream_gradient("random", T, seed)


# What the op's backward has to correct for: nothing (a mean over all tokens), the masked tokens (a
# mean under a loss mask), the tokens kept when most are masked (the common value is 0), every token.
GRADIENT_KINDS = ("mean", "masked mean", "mostly masked", "random")


def upstream_gradient(kind, T, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    keep = torch.rand(T, generator=g) >= (0.8 if kind == "mostly masked" else 0.3)
    if kind == "mean":
        return torch.full((T,), 1.0 / T)
    if kind in ("masked mean", "mostly masked"):
        return keep.float() / keep.sum().clamp_min(1)
    if kind == "random":
        return torch.rand(T, generator=g) * 2.0 * keep
    raise ValueError(kind)


def reference(hidden, weight, labels, grad_out):
    """Per-token loss, dh and dW from full logits, computed in fp64 from the given (rounded) inputs."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), labels, reduction="none")
    loss.backward(grad_out.double())
    return loss.detach(), h.grad, w.grad


def run_op(hidden, weight, labels, grad_out, num_chunks, tp_group=None):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, num_chunks, tp_group=tp_group)
    loss.backward(grad_out)
    return loss.detach(), h.grad, w.grad
