"""HostOffload on its own: what it moves, exact values back, host bytes, buffer reuse, misuse."""

import pytest
import torch

from mst_megatron.ops.offload import HostOffload


def _chain_grads(offload, weights, x, constant):
    """A 4-matmul tanh chain (each step saves its input and output); every gradient after backward."""
    h = x
    with offload.scope() if offload is not None else torch.enable_grad():
        for w in weights:
            h = torch.tanh(h @ w + constant)
    (h * h).sum().backward()
    grads = [t.grad.clone() for t in (*weights, x)]
    for t in (*weights, x):
        t.grad = None
    return grads


@pytest.fixture
def chain():
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(64, 64, generator=g) / 8).requires_grad_() for _ in range(4)]
    x = torch.randn(512, 64, generator=g, requires_grad=True)
    return weights, x, torch.randn(64, generator=g)


def test_backward_is_bit_identical_and_host_bytes_are_the_activations(chain):
    weights, x, constant = chain
    ref = _chain_grads(None, weights, x, constant)
    offload = HostOffload(min_bytes=64 * 1024)  # the [512, 64] activations (128 KiB), not the weights
    for _ in range(2):  # the second step reuses the first step's host buffers
        got = _chain_grads(offload, weights, x, constant)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        assert offload.host_bytes == 0  # all came back
    # saved per step: x and each tanh's input/output pair that requires grad, [512, 64] fp32 each
    assert offload.peak_host_bytes == 8 * 512 * 64 * 4
    assert sum(len(free) for free in offload._pool.values()) == 8  # no buffer allocated twice


def test_constants_and_small_tensors_stay(chain):
    weights, x, constant = chain
    offload = HostOffload(min_bytes=512 * 64 * 4 + 1)  # larger than any activation
    _chain_grads(offload, weights, x, constant)
    assert offload.peak_host_bytes == 0
    big_constant = torch.randn(512, 64)  # saved by mul, but needs no grad: never offloaded
    with HostOffload(min_bytes=1).scope():
        y = (x * big_constant).sum()
    y.backward()
    assert torch.equal(x.grad, big_constant)


def test_pause_keeps_tensors_on_the_device(chain):
    weights, x, constant = chain
    offload = HostOffload(min_bytes=1)
    with offload.scope():
        with offload.pause():
            y = torch.tanh(x @ weights[0]).sum()
    assert offload.peak_host_bytes == 0
    y.backward()


def test_second_unpack_is_refused():
    x = torch.randn(256, 256, requires_grad=True)
    with HostOffload(min_bytes=1).scope():
        y = torch.tanh(x).sum()
    y.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="unpacked twice"):
        y.backward()


@pytest.mark.parametrize("kwargs, message", [(dict(max_in_flight=0), "max_in_flight must be >= 1, got 0"),
                                             (dict(min_bytes=-1), "min_bytes must be >= 0, got -1")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HostOffload(**kwargs)
