"""The ring-attention op (:mod:`mst_megatron.ops.ring_attention`) on gloo ranks, against plain SDPA of
the whole sequence on one rank: output and the gradients of query, key and value, fp32 and fp64
kernels' tolerances, causal (load-balanced shards) and unmasked, grouped-query K/V; the bytes the
op sends, counted at ``isend``, against the algorithm's count; the refusals."""

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
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


CASES = [
    # s, b, heads, kv_heads, d, causal: s / (2 cp) chunks of 12, 6 and 3 at cp 2, 4 and 8
    (48, 2, 4, 4, 8, True),
    (48, 1, 4, 2, 8, True),   # grouped-query: two query heads per K/V head
    (48, 2, 2, 1, 16, False),
]


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_ring_matches_full_attention(tmp_path, cp):
    run_on_ranks(body, cp, str(tmp_path), CASES, timeout=240)
    for rank in range(cp):
        with open(tmp_path / f"rank{rank}.json") as f:
            for r in json.load(f):
                assert max(r["errs"]) <= TOL, r
                # forward: cp - 1 K/V shards; backward: cp - 1 K/V shards and cp fp32 K/V gradients
                assert r["sent_forward"] == (cp - 1) * r["kv_bytes"], r
                assert r["sent_backward"] == (2 * cp - 1) * r["kv_bytes"], r


def test_refusals():
    from mst_megatron.ops.ring_attention import ring_attention

    with pytest.raises(ValueError, match=r"local sequence length \(7\) must hold two equal chunks"):
        ring_attention(torch.zeros(7, 1, 2, 4), torch.zeros(7, 1, 2, 4), torch.zeros(7, 1, 2, 4), None)
    with pytest.raises(ValueError, match=r"query heads a multiple of key/value heads"):
        ring_attention(torch.zeros(8, 1, 3, 4), torch.zeros(8, 1, 2, 4), torch.zeros(8, 1, 2, 4), None)
