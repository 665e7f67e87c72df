"""The layer-spec comparison: a stock megatron GPT (local spec) and the MST one with its weights,
one batch through megatron's schedule; loss, every gradient and the MLP's fc1 calls compared.

fp32 tolerances: loss relative error <= 1e-5, every parameter gradient within 1e-4 of the
reference's max abs (float rounding only: SDPA against the stock softmax attention, chunk-sized GEMMs).
"""

import math

import torch

import mst_megatron
from tests.helpers.models import mst_gpt, stock_gpt, tiny_config
from tests.helpers.training import fixed_batches, forward_backward, grad_error, grads_by_name, unwrap, wrap_ddp

LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
CHUNK_COUNTS = (1, 2, 3, 8, "S")  # "S": one token per chunk
RECOMPUTE = {
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    # megatron 0.16.1's "layernorm" recompute needs Transformer Engine (FP8GlobalStateManager)
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
}



def fc1_call_counter(chunks):
    calls = [0]
    for chunk in chunks:
        for module in unwrap(chunk).modules():
            if isinstance(module, mst_megatron.MiniSequenceMLP):
                module.linear_fc1.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def expected_fc1_calls(config, m, seq_length, num_microbatches, chunks):
    """Per layer and micro-batch: M chunks in forward, M more when backward recomputes them (M > 1),
    M more in megatron's recompute of the layer or MLP. M from the documented rule."""
    from megatron.core import parallel_state as ps

    sp = ps.get_tensor_model_parallel_world_size() if config.sequence_parallel else 1
    # "auto": chunks of about hidden_size tokens of the sequence the MLP sees (SP-gathered)
    m = min(math.ceil(seq_length / config.hidden_size) if m == "auto" else m, seq_length // sp)
    layers = sum(len(unwrap(c).decoder.layers) for c in chunks)
    if config.recompute_granularity == "selective" and "mlp" in config.recompute_modules:
        recomputed = layers
    elif config.recompute_granularity == "full" and config.recompute_method == "uniform":
        recomputed = layers
    elif config.recompute_granularity == "full":  # block: the first recompute_num_layers per chunk
        recomputed = len(chunks) * min(config.recompute_num_layers, layers)
    else:
        recomputed = 0
    return num_microbatches * (layers * (1 if m == 1 else 2 * m) + recomputed * m)


def compare(case, m, seq_length, micro_batch_size, num_microbatches=1, ref=None, mst=None, ddp=False):
    """Stock model (``tiny_config(**ref)``) vs MST model (``tiny_config(**mst)``, ``m`` mini-sequences,
    "S" for one token each) loaded with the stock weights, one batch through megatron's schedule."""
    ref_config, mst_config = tiny_config(**(ref or {})), tiny_config(**(mst or {}))
    tokens, labels = fixed_batches(num_microbatches, micro_batch_size, seq_length, 256, seed=seq_length)
    torch.manual_seed(0)
    ref_chunks = [stock_gpt(ref_config, seq_length=seq_length, qk_layernorm=ref_config.qk_layernorm)]
    m = seq_length if m == "S" else m
    mst_chunks = [mst_gpt(mst_config, m, seq_length=seq_length)]
    mst_chunks[0].load_state_dict(ref_chunks[0].state_dict(), strict=True)
    if ddp:
        mst_chunks = wrap_ddp(mst_chunks, mst_config)
    calls = fc1_call_counter(mst_chunks)
    ref_loss = seeded(forward_backward, ref_chunks, tokens, labels)
    mst_loss = seeded(forward_backward, mst_chunks, tokens, labels)
    result = {
        "case": case,
        "grad_err": grad_error(grads_by_name(mst_chunks), grads_by_name(ref_chunks)),
        "fc1_calls": calls[0],
        "fc1_expected": expected_fc1_calls(mst_config, m, seq_length, num_microbatches, mst_chunks),
    }
    if ref_loss is not None:
        result["loss_err"] = abs(mst_loss - ref_loss) / abs(ref_loss)
    return result


def seeded(fn, *args):
    """``fn(*args)`` from the same default and model-parallel RNG states (the dropout masks)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    return fn(*args)


def check(results):
    for r in results:
        assert r["grad_err"] <= GRAD_TOL, r
        assert r.get("loss_err", 0.0) <= LOSS_TOL, r
        assert r["fc1_calls"] == r["fc1_expected"], r


def sweep(seqs, microbatch_sizes=(2,)):
    return [(s, m, b) for s in seqs for m in CHUNK_COUNTS for b in microbatch_sizes]
