"""The ring-attention op (:mod:`mst_megatron.ops.ring_attention`) on gloo ranks, against plain SDPA of
the whole sequence on one rank: output and the gradients of query, key and value, fp32 and fp64
kernels' tolerances, causal (load-balanced shards) and unmasked, grouped-query K/V; the bytes the
op sends, counted at ``isend``, against the algorithm's count; the op's peak memory (MemTracker)
against the buffers its design holds; the refusals, a second backward among them."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import rel_err
from tests.helpers.multirank import run_on_ranks

TOL = 2e-6  # fp32, relative to the reference's max abs


def _layout_index(s: int, cp: int, rank: int) -> torch.Tensor:
    """Positions of rank ``rank``'s load-balanced shard: chunks ``rank`` and ``2cp-1-rank``."""
    c = s // (2 * cp)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)])


def body(out_dir, cases):
    import torch.distributed as dist

    from mst_megatron.measure.memory import measure_peak
    from mst_megatron.measure.traffic import SentBytes
    from mst_megatron.ops.ring_attention import ring_attention

    dist.init_process_group("gloo")
    cp, rank = dist.get_world_size(), dist.get_rank()
    results = []
    for s, b, heads, kv_heads, d, causal in cases:
        g = torch.Generator().manual_seed(s + heads + kv_heads)
        q = torch.randn(s, b, heads, d, generator=g)
        k, v = (torch.randn(s, b, kv_heads, d, generator=g) for _ in range(2))
        dout = torch.randn(s, b, heads, d, generator=g)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(
            *(t.permute(1, 2, 0, 3) for t in full), is_causal=causal, enable_gqa=heads != kv_heads
        ).permute(2, 0, 1, 3)
        ref.backward(dout)
        idx = _layout_index(s, cp, rank) if causal else torch.arange(rank * s // cp, (rank + 1) * s // cp)
        local = [t[idx].clone().requires_grad_() for t in (q, k, v)]
        with SentBytes() as sent:
            out = ring_attention(*local, dist.group.WORLD, causal=causal)
            sent_forward = sent.bytes
            out.backward(dout[idx])
        errs = [rel_err(out, ref[idx])] + [rel_err(t.grad, f.grad[idx]) for t, f in zip(local, full)]
        kv_bytes = 2 * (s // cp) * b * kv_heads * d * 4
        results.append(dict(case=[s, b, heads, kv_heads, d, causal], errs=errs, sent_forward=sent_forward,
                            sent_backward=sent.bytes - sent_forward, kv_bytes=kv_bytes))
    # One causal grouped-query forward + backward under MemTracker (inputs and upstream gradient
    # counted), then a second backward through a retained graph.
    s_local, b, heads, kv_heads, d = MEMORY_CASE
    g = torch.Generator().manual_seed(1)
    local = [torch.randn(s_local, b, n, d, generator=g, requires_grad=True) for n in (heads, kv_heads, kv_heads)]
    dout = torch.randn(s_local, b, heads, d, generator=g)
    peak = measure_peak(lambda: ring_attention(*local, dist.group.WORLD).backward(dout), (*local, dout))["total"]
    out = ring_attention(*local, dist.group.WORLD)
    out.backward(dout, retain_graph=True)
    try:
        out.backward(dout)
        refusal = None
    except RuntimeError as e:
        refusal = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(cases=results, peak=peak, refusal=refusal), f)


CASES = [
    # s, b, heads, kv_heads, d, causal: s / (2 cp) chunks of 12, 6 and 3 at cp 2, 4 and 8
    (48, 2, 4, 4, 8, True),
    (48, 1, 4, 2, 8, True),   # grouped-query: two query heads per K/V head
    (48, 2, 2, 1, 16, False),
]


MEMORY_CASE = (256, 1, 8, 4, 16)  # local tokens, b, heads, kv_heads, d


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``results(cp)``: each rank's results of :func:`body` on ``cp`` ranks, run on first use."""
    runs = {}

    def ranks(cp):
        if cp not in runs:
            out = tmp_path_factory.mktemp(f"cp{cp}")
            run_on_ranks(body, cp, str(out), CASES, timeout=240)
            runs[cp] = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(cp)]
        return runs[cp]

    return ranks


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_ring_matches_full_attention(results, cp):
    for rank in results(cp):
        for r in rank["cases"]:
            assert max(r["errs"]) <= TOL, r
            # forward: cp - 1 K/V shards; backward: cp - 1 K/V shards and cp fp32 K/V gradients
            assert r["sent_forward"] == (cp - 1) * r["kv_bytes"], r
            assert r["sent_backward"] == (2 * cp - 1) * r["kv_bytes"], r


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_ring_working_set(results, cp):
    """The peak of a causal forward + backward (fp32) is what the design holds at the backward's
    busiest step (docs/design.md#ring): the inputs, the upstream gradient, the saved output and
    log-sum-exp, two K/V buffers (the saved local one is received into once sent on), two K/V gradient
    buffers (one accumulating and going out, one coming in), the query gradient and one block's
    gradients (all queries x half the keys, or half the queries x all keys)."""
    s_local, b, heads, kv_heads, d = MEMORY_CASE
    q, kv = s_local * b * heads * d * 4, 2 * s_local * b * kv_heads * d * 4
    lse = b * heads * s_local * 4
    bound = (q + kv) + q + (q + lse) + 2 * kv + 2 * kv + q + max(q + kv // 2, q // 2 + kv)
    for rank in results(cp):
        assert rank["peak"] <= bound, (rank["peak"] / q, bound / q)


@pytest.mark.parametrize("cp", [2, 4])
def test_second_backward_refused(results, cp):
    for rank in results(cp):
        assert rank["refusal"] is not None and "backward runs once per forward" in rank["refusal"], rank["refusal"]


def test_refusals():
    from mst_megatron.ops.ring_attention import ring_attention

    with pytest.raises(ValueError, match=r"local sequence length \(7\) must hold two equal chunks"):
        ring_attention(torch.zeros(7, 1, 2, 4), torch.zeros(7, 1, 2, 4), torch.zeros(7, 1, 2, 4), None)
    with pytest.raises(ValueError, match=r"query heads a multiple of key/value heads"):
        ring_attention(torch.zeros(8, 1, 3, 4), torch.zeros(8, 1, 2, 4), torch.zeros(8, 1, 2, 4), None)


def order_body(out_dir, cp):
    """Run one causal forward + backward with ``dist.isend``/``dist.irecv``, their requests' ``wait``
    and the op's block kernels wrapped to log their calls in order; rank 0 writes the log."""
    import torch.distributed as dist

    from mst_megatron.ops import ring_attention as ring

    dist.init_process_group("gloo")
    log = []

    class LoggedWork:
        def __init__(self, work):
            self.work = work

        def wait(self):
            log.append("wait")
            return self.work.wait()

    def logged(name, fn, returns_work=False):
        def call(*args, **kwargs):
            log.append(name)
            result = fn(*args, **kwargs)
            return LoggedWork(result) if returns_work else result

        return call

    originals = dist.isend, dist.irecv, ring._block_forward, ring._block_backward
    dist.isend = logged("isend", originals[0], returns_work=True)
    dist.irecv = logged("irecv", originals[1], returns_work=True)
    ring._block_forward = logged("forward kernel", originals[2])
    ring._block_backward = logged("backward kernel", originals[3])
    try:
        q, k, v = (torch.randn(4 * cp, 1, 2, 8, requires_grad=True) for _ in range(3))
        out = ring.ring_attention(q, k, v, dist.group.WORLD)
        forward_log = list(log)
        out.sum().backward()
    finally:
        dist.isend, dist.irecv, ring._block_forward, ring._block_backward = originals
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "order.json"), "w") as f:
            json.dump(dict(forward=forward_log, backward=log[len(forward_log):]), f)


def test_next_shard_posted_before_current_block_is_computed(tmp_path):
    """gloo's overlap: at every ring step the next K/V shard's ``isend``/``irecv`` (and in backward the
    visiting shard's gradient's) are posted before this step's block kernel, and waited on after it."""
    cp = 3
    run_on_ranks(order_body, cp, str(tmp_path), cp, timeout=120)
    with open(tmp_path / "order.json") as f:
        order = json.load(f)
    post, done = ["isend", "irecv"], ["wait", "wait"]
    # forward step i < cp-1: post the next shard, compute this one, wait; the last step only computes
    assert order["forward"] == (post + ["forward kernel"] + done) * (cp - 1) + ["forward kernel"]
    # backward step i: post the next K/V shard (i < cp-1), compute, wait for the previous rank's partial
    # gradient of the visiting shard (i > 0), post this shard's gradient onward, wait for the K/V
    first = post + ["backward kernel"] + post + done
    middle = post + ["backward kernel"] + done + post + done
    last = ["backward kernel"] + done + post
    assert order["backward"] == first + middle * (cp - 2) + last + done
