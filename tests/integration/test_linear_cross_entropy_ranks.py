"""The LM-head cross-entropy op on two gloo ranks: tensor parallelism (vocab shards) and sequence
parallelism (token shards gathered chunk by chunk), against the full-logits fp64 reference."""

from unittest import mock

import pytest
import torch
import torch.distributed as dist

from mst_megatron.ops.linear_cross_entropy import linear_cross_entropy, vocab_blocks
from tests.helpers import OpLog, rel_err
from tests.helpers.cross_entropy import GRADIENT_KINDS, make_inputs, reference, run_op, upstream_gradient
from tests.helpers.multirank import run_on_ranks

TP_T, TP_V, TP_H = 13, 40, 8
TP_LABELS_PINNED = {0: 3, 1: 31, 2: 20, 3: 19}  # rank 0's shard, rank 1's shard, both shard edges


def _tp_body(num_chunks_list, threads):
    dist.init_process_group("gloo")
    mock.patch.object(torch, "get_num_threads", return_value=threads).start()  # vocab blocks per shard
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden, weight, labels, _ = make_inputs(TP_T, TP_V, TP_H)  # same seed on every rank
    for pos, label in TP_LABELS_PINNED.items():
        labels[pos] = label
    v_local = TP_V // world
    shard = slice(rank * v_local, (rank + 1) * v_local)
    assert vocab_blocks(weight[shard]) == threads
    for num_chunks in num_chunks_list:
        for kind in GRADIENT_KINDS:
            grad_out = upstream_gradient(kind, TP_T)
            ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, grad_out)
            loss, dh, dw = run_op(hidden, weight[shard], labels, grad_out, num_chunks, dist.group.WORLD)
            dist.all_reduce(dh)  # the caller's region function does this in the model
            case = (num_chunks, kind)
            assert rel_err(loss, ref_loss) <= 1e-5, case
            assert rel_err(dw, ref_dw[shard]) <= 1e-4, case
            assert rel_err(dh, ref_dh) <= 1e-4, case


@pytest.mark.parametrize("threads", [1, 4])  # the vocab shard (20) in 1 block, or 4 of 5 columns
def test_tensor_parallel_two_ranks(threads):
    run_on_ranks(_tp_body, 2, [1, 4, TP_T], threads)


SP_T_LOCAL = 15  # tokens per rank; 4 chunks of it are uneven (4, 4, 4, 3)


def _sp_body(num_chunks_list, threads):
    """Sequence parallelism: rank r holds tokens r * SP_T_LOCAL ... of the sequence and vocab shard r."""
    dist.init_process_group("gloo")
    mock.patch.object(torch, "get_num_threads", return_value=threads).start()  # vocab blocks per shard
    rank, world = dist.get_rank(), dist.get_world_size()
    T = SP_T_LOCAL * world
    hidden, weight, labels, _ = make_inputs(T, TP_V, TP_H)  # same seed on every rank
    for pos, label in TP_LABELS_PINNED.items():  # shard-edge labels on the first tokens of rank 0
        labels[pos] = label
    v_local = TP_V // world
    shard = slice(rank * v_local, (rank + 1) * v_local)
    assert vocab_blocks(weight[shard]) == threads
    rows = slice(rank * SP_T_LOCAL, (rank + 1) * SP_T_LOCAL)
    for num_chunks in num_chunks_list:
        for kind in GRADIENT_KINDS:
            case = (num_chunks, kind)
            grad_out = upstream_gradient(kind, T)
            ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, grad_out)
            h = hidden[rows].clone().requires_grad_()
            w = weight[shard].clone().requires_grad_()
            with OpLog(width=TP_H) as widest:
                loss = linear_cross_entropy(h, w, labels, num_chunks, dist.group.WORLD, sequence_parallel=True)
                saved_hidden = loss.grad_fn.saved_tensors[0]
                loss.backward(grad_out)
            # The loss of every token on every rank; dh complete (no reduction left to the caller).
            assert rel_err(loss, ref_loss) <= 1e-5, case
            assert rel_err(w.grad, ref_dw[shard]) <= 1e-4, case
            assert rel_err(h.grad, ref_dh[rows]) <= 1e-4, case
            # Backward keeps this rank's shard itself, not a gathered copy.
            assert saved_hidden.shape == h.shape and saved_hidden.data_ptr() == h.data_ptr(), case
            if num_chunks > 1:  # no [tokens, h] tensor as tall as the gathered sequence, forward or backward
                tallest = max(s[0] for s in widest.shapes if len(s) == 2)
                assert tallest < T, (case, tallest)
    with pytest.raises(ValueError, match=f"labels must be 1-D of length T={T}"):
        linear_cross_entropy(hidden[rows], weight[shard], labels[rows], 1, dist.group.WORLD, sequence_parallel=True)


@pytest.mark.parametrize("threads", [1, 4])
def test_sequence_parallel_two_ranks(threads):
    run_on_ranks(_sp_body, 2, [1, 4, SP_T_LOCAL], threads)
