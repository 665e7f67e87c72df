"""Context-parallel traffic: the bytes each rank sends in one forward + backward of MST's attention
(``SDPAttention``) for ``cp_comm_type`` "a2a", "p2p" and "a2a+p2p" at the same sequence and CP,
counted at the collective calls, beside what the algorithm predicts.

Counted: ``all_to_all_single`` sends ``(n - 1) / n`` of its input to the other ``n - 1`` ranks of its
group; ``isend`` sends its whole tensor. Predicted, per rank, with ``Q`` the bytes of its query shard,
``KV`` those of its key and value shards together (fp32) and ``r`` the K/V replication of the
all-to-all (:meth:`mst_megatron.layout.ParallelLayout.kv_replication`):

* all-to-all over ``a`` ranks: forward Q, r x KV and the context (Q-sized) go ``(a - 1) / a`` out,
  backward their gradients the same: ``2 (a - 1) / a (2 Q + r KV)``;
* the ring over ``p`` ranks, on what the all-to-all leaves (``a`` times the tokens, ``1 / a`` of
  the heads, so ``r KV`` per rank): forward ``p - 1`` K/V shards, backward ``p - 1`` more and ``p``
  fp32 K/V gradients: ``(3 p - 2) r KV``.

Examples::

    python -m benchmarks.bench_cp_traffic                 # CP 4, S = 4096: rows into results/rows.jsonl
    python -m benchmarks.bench_cp_traffic --seq 512 --rows ''
"""

import argparse
import json
import os
import tempfile

import torch

from benchmarks.common import (add_rows_argument, machine, machine_name, make_row, provenance, rows_path,
                               shape_text, write_rows)
from mst_megatron.measure.traffic import SentBytes
from tests.helpers.multirank import run_on_ranks

CP = 4
HEADS, GROUPS, HEAD_DIM, BATCH = 8, 2, 32, 1
EXCHANGES = {"a2a": None, "p2p": None, "a2a+p2p": [2, 2]}  # comm type -> hierarchical sizes


def predicted_bytes(seq: int, exchange: str) -> int:
    """The module docstring's formula for one rank (fp32)."""
    from mst_megatron.layout import ParallelLayout

    sizes = EXCHANGES[exchange]
    layout = ParallelLayout(cp=CP, cp_comm_type=exchange, hierarchical_cp_sizes=None if sizes is None else tuple(sizes))
    a, p = layout.a2a_size, layout.ring_size
    tokens = seq // CP * BATCH
    q, kv = tokens * HEADS * HEAD_DIM * 4, 2 * tokens * GROUPS * HEAD_DIM * 4
    r = layout.kv_replication(GROUPS)
    total = 2 * (a - 1) * (2 * q + r * kv) // a if a > 1 else 0
    return total + ((3 * p - 2) * r * kv if p > 1 else 0)


def body(seq: int, out_dir: str) -> None:
    """On each of CP ranks: every exchange's forward + backward, the bytes this rank sent."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnMaskType

    import mst_megatron
    from mst_megatron.modules.attention import SDPAttention
    from mst_megatron.specs.llama_config import llama_transformer_config

    results = {}
    for exchange, sizes in EXCHANGES.items():
        mst_megatron.init_parallel(context_parallel_size=CP, hierarchical_context_parallel_sizes=sizes)
        config = llama_transformer_config(num_layers=1, hidden_size=HEADS * HEAD_DIM, ffn_hidden_size=64,
                                          num_attention_heads=HEADS, num_query_groups=GROUPS,
                                          context_parallel_size=CP, hierarchical_context_parallel_sizes=sizes,
                                          params_dtype=torch.float32, attention_dropout=0.0)
        attention = SDPAttention(config, 1, AttnMaskType.causal, "self", cp_comm_type=exchange)
        g = torch.Generator().manual_seed(ps.get_context_parallel_rank())
        s_local = seq // CP
        q = torch.randn(s_local, BATCH, HEADS, HEAD_DIM, generator=g, requires_grad=True)
        k, v = (torch.randn(s_local, BATCH, GROUPS, HEAD_DIM, generator=g, requires_grad=True) for _ in "kv")
        with SentBytes() as sent:
            attention(q, k, v, None).sum().backward()
        results[exchange] = sent.bytes
        ps.destroy_model_parallel()
    with open(os.path.join(out_dir, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(results, f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096, help=f"global sequence length (a multiple of {2 * CP})")
    add_rows_argument(p)
    args = p.parse_args(argv)
    if args.seq % (2 * CP):
        p.error(f"--seq {args.seq} must be a multiple of 2 x CP = {2 * CP}")
    prov = provenance(f"python -m benchmarks.bench_cp_traffic --seq {args.seq}")
    with tempfile.TemporaryDirectory() as out:
        run_on_ranks(body, CP, args.seq, out, timeout=600)
        sent = []
        for r in range(CP):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                sent.append(json.load(f))
    shape = shape_text(S=args.seq, CP=CP, heads=f"{HEADS}/{GROUPS}", d=HEAD_DIM, b=BATCH)
    rows = []
    print(f"{'cp_comm_type':>12} {'sent per rank (MiB)':>20} {'predicted (MiB)':>16}")
    for exchange in EXCHANGES:
        counted = max(s[exchange] for s in sent)
        predicted = predicted_bytes(args.seq, exchange)
        print(f"{exchange:>12} {counted / 2**20:>20.2f} {predicted / 2**20:>16.2f}")
        rows.append(make_row("cp_traffic", exchange, shape, "fp32", machine_name(machine(), 1),
                             dict(sent_bytes=counted, predicted_bytes=predicted,
                                  sent_bytes_by_rank=[s[exchange] for s in sent]), prov))
    if rows_path(args):
        write_rows(rows, rows_path(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
