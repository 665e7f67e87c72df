"""Context parallelism for MST models: the whole MST model (SDPA attention with the Ulysses all-to-all,
the ring, or both; mini-sequence MLP and LM head) under CP=2, CP=4, TP=2 x CP=2 with sequence
parallelism and PP=2 x CP=2 (and DP=2 x CP=2), against the single-rank stock megatron-core model with the same global weights and batch.

Reference: every rank of the spawned world first builds the single-rank stock ``GPTModel`` (seed 0),
runs the global batch and saves its weights, then its gradients in place of the weights, as two
megatron dist checkpoints. The layout's MST model loads the first (resharded to its TP/PP/CP ranks
by megatron), runs the same batch sharded per CP rank by ``get_batch_on_this_cp_rank`` through
megatron's schedule and DDP, and is compared with the second, loaded the same way. fp32 tolerances:
loss relative error <= 1e-5, every gradient within 1e-4 of the reference's max abs. Chunk counts are
chosen so that no mini-sequence count divides the local length or token count, and each rank's
counts are checked equal across the world.
"""

import json
import os

import pytest
import torch

import mst_megatron
from tests.helpers.models import mst_full_gpt, stock_gpt, tiny_config
from tests.helpers.multirank import run_on_ranks
from tests.helpers.training import fixed_batches, forward_backward, grad_error, grads_by_name, wrap_ddp

LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
VOCAB = 256

# layout name -> sizes, global sequence length S, micro-batch b, micro-batches, chunk counts, the
# model overrides (reference too) and the parallel-only overrides (the MST model only).
SP = dict(sequence_parallel=True)
FULL_RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
# All on one world of four ranks (spawning ranks costs ~10 s each): the CP=2 layouts there also have
# two data-parallel replicas, which see the same batch, so the comparison is unchanged.
LAYOUTS = {
    # S=36: 18 local tokens (M=4 does not divide), 36 head tokens (M=7 does not divide)
    "dp2-cp2": dict(cp=2, S=36, b=2, mb=2, mlp=4, head=7),
    # one K/V group for two CP ranks: replicated before the exchange, gradients summed back
    "dp2-cp2-mqa": dict(cp=2, S=36, b=2, mb=1, mlp=5, head=7, model=dict(num_query_groups=1)),
    # "auto": 130 local tokens -> ceil(130 / 64) = 3 MLP chunks; ceil(256 / 64) = 4 head chunks
    "dp2-cp2-auto-recompute": dict(cp=2, S=260, b=1, mb=1, mlp="auto", head="auto", parallel=FULL_RECOMPUTE),
    # 10 local tokens, 2 K/V groups for 4 CP ranks (replicated x2)
    "cp4": dict(cp=4, S=40, b=2, mb=2, mlp=3, head=7),
    # 74 CP-local tokens, 37 per SP shard (M=4; head M=7 of 74 tokens); the QKV projection gathers them
    # in ceil(74 / 64) = 2 chunks (19 and 18 per rank); 2 heads and 1 K/V group per TP rank (replicated x2)
    "tp2-cp2-sp": dict(tp=2, cp=2, S=148, b=2, mb=2, mlp=4, head=7, parallel=SP),
    "pp2-cp2": dict(pp=2, cp=2, S=36, b=2, mb=4, mlp=4, head=7),
}
# The ring ("p2p") and the all-to-all inside groups with a ring across them ("a2a+p2p"): most
# layouts use 2 attention heads and 1 or 2 K/V groups, which no all-to-all layout could split past CP 2.
RING = dict(cp_comm_type="p2p")
TWO_HEADS = dict(num_attention_heads=2, num_query_groups=1)
RING_LAYOUTS = {
    # S=36: 18 local tokens (MLP M=4 does not divide), 36 head tokens (M=7 does not divide); DP 2
    "dp2-cp2-ring": dict(cp=2, S=36, b=2, mb=2, mlp=4, head=7, model=TWO_HEADS, parallel=RING),
    # 10 local tokens in chunks of 5; full recompute reruns the ring in the backward
    "cp4-ring-recompute": dict(cp=4, S=40, b=2, mb=2, mlp=3, head=7, model=TWO_HEADS,
                               parallel=dict(RING, **FULL_RECOMPUTE)),
    # one head and one K/V group per TP rank; 37 tokens per SP shard
    "tp2-cp2-sp-ring": dict(tp=2, cp=2, S=148, b=2, mb=2, mlp=4, head=7,
                            model=dict(num_attention_heads=2, num_query_groups=2), parallel=dict(RING, **SP)),
    "pp2-cp2-ring": dict(pp=2, cp=2, S=36, b=2, mb=4, mlp=4, head=7, model=TWO_HEADS, parallel=RING),
    # all-to-all inside pairs of CP ranks (4 heads, 2 K/V groups -> 2 and 1 per rank), ring across
    "cp4-a2a+p2p": dict(cp=4, hcp=[2, 2], S=40, b=2, mb=2, mlp=3, head=7,
                        parallel=dict(cp_comm_type="a2a+p2p", hierarchical_context_parallel_sizes=[2, 2])),
}
WORLDS = {"a2a": LAYOUTS, "ring": RING_LAYOUTS}  # one spawned world of four ranks each
WORLD_SIZE = 4


def _record_chunk_counts(model):
    """Every chunk count the model's MLPs and LM head compute, in call order."""
    counts = {"mlp": [], "head": []}
    for module in model.modules():
        name = {"MiniSequenceMLP": ("mlp", "num_chunks"), "MiniSequenceLMHead": ("head", "num_chunks")}
        kind, method = name.get(type(module).__name__, (None, None))
        if kind is None:
            continue
        original = getattr(module, method)

        def recorded(*args, _original=original, _into=counts[kind]):
            _into.append(_original(*args))
            return _into[-1]

        setattr(module, method, recorded)
    return counts


def _reference(name, layout, tokens, labels, work_dir):
    """The single-rank stock model on every rank: its loss; weights and gradients saved as checkpoints."""
    from megatron.core import dist_checkpointing, parallel_state as ps

    mst_megatron.init_parallel()
    torch.manual_seed(0)
    model = stock_gpt(tiny_config(**layout.get("model", {})), vocab_size=VOCAB, seq_length=layout["S"])
    loss = forward_backward([model], tokens, labels)
    paths = {what: os.path.join(work_dir, name, what) for what in ("weights", "grads")}
    if torch.distributed.get_rank() == 0:
        for path in paths.values():
            os.makedirs(path)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), paths["weights"])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    dist_checkpointing.save(model.sharded_state_dict(), paths["grads"])
    ps.destroy_model_parallel()
    return loss, paths


def run_layout(name, layout, work_dir):
    """One layout against the single-rank reference; this rank's errors and chunk counts."""
    from megatron.core import dist_checkpointing, parallel_state as ps

    tokens, labels = fixed_batches(layout["mb"], layout["b"], layout["S"], VOCAB, seed=layout["S"])
    ref_loss, paths = _reference(name, layout, tokens, labels, work_dir)

    mst_megatron.init_parallel(layout.get("tp", 1), layout.get("pp", 1), layout["cp"],
                               hierarchical_context_parallel_sizes=layout.get("hcp"))
    config = tiny_config(**layout.get("model", {}), **layout.get("parallel", {}))

    def load(what):
        model = mst_full_gpt(config, layout["mlp"], layout["head"], vocab_size=VOCAB, seq_length=layout["S"])
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), paths[what]))
        return model

    model, expected = load("weights"), load("grads")
    counts = _record_chunk_counts(model)
    chunks = wrap_ddp([model], config)
    loss = forward_backward(chunks, tokens, labels)
    ref_grads = {f"0.{n}": p.detach() for n, p in expected.named_parameters()}
    # Tokens per CP (and SP) rank, which the MLP and head chunk; the head sees them for the whole micro-batch.
    local_tokens = layout["S"] // layout["cp"] // (layout.get("tp", 1) if config.sequence_parallel else 1)
    result = dict(case=name, grad_err=grad_error(grads_by_name(chunks), ref_grads), counts=counts,
                  mlp_tokens=local_tokens, head_tokens=local_tokens * layout["b"])
    if loss is not None:
        result["loss_err"] = abs(loss - ref_loss) / abs(ref_loss)
    ps.destroy_model_parallel()
    return result


def check_exchange():
    """The all-to-all pair on a CP=2 group: the whole sequence in natural order for this rank's
    heads, and back to the rank's load-balanced shard, exactly."""
    from megatron.core import parallel_state as ps
    from mst_megatron.runtime.mcore_adapter import batch_on_this_cp_rank

    from mst_megatron.ops.context_parallel import heads_to_sequence, sequence_to_heads

    mst_megatron.init_parallel(context_parallel_size=2)
    group, rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    full = torch.randn(12, 3, 4, 5, generator=torch.Generator().manual_seed(0))  # [s, b, heads, d]
    # get_batch_on_this_cp_rank slices dim 1: hand it [b, s, ...] and take it back
    shard = batch_on_this_cp_rank({"x": full.transpose(0, 1)})["x"].transpose(0, 1).contiguous()
    gathered = sequence_to_heads(shard.requires_grad_(), group)
    assert torch.equal(gathered, full[:, :, 2 * rank:2 * rank + 2]), "sequence_to_heads"
    back = heads_to_sequence(gathered, group)
    assert torch.equal(back, shard), "heads_to_sequence"
    back.backward(torch.ones_like(back))  # a permutation: every element's gradient is 1
    assert torch.equal(shard.grad, torch.ones_like(shard)), "backward"
    ps.destroy_model_parallel()


def world_body(out_dir, layouts, exchange=True):
    """The exchange check (if asked), then every layout against the single-rank reference."""
    if exchange:
        check_exchange()
    results = [run_layout(name, layout, out_dir) for name, layout in layouts.items()]
    with open(os.path.join(out_dir, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(results, f)


def run_world(out, layouts, world_size, timeout, exchange=False):
    """:func:`world_body` on ``world_size`` ranks; each case's per-rank results."""
    run_on_ranks(world_body, world_size, str(out), layouts, exchange, timeout=timeout)
    by_case = {}
    for rank in range(world_size):
        with open(out / f"rank{rank}.json") as f:
            for r in json.load(f):
                by_case.setdefault(r["case"], []).append(r)
    return by_case


def check_matches(ranks, case):
    """Loss and every gradient within the fp32 tolerances on every rank."""
    print(case, "worst loss rel. err", max(r.get("loss_err", 0.0) for r in ranks),
          "worst grad rel. err", max(r["grad_err"] for r in ranks))
    assert any("loss_err" in r for r in ranks)  # the last stage saw the loss
    for r in ranks:
        assert r["grad_err"] <= GRAD_TOL, r
        assert r.get("loss_err", 0.0) <= LOSS_TOL, r


def check_chunk_counts(ranks):
    """One MLP chunk count on every rank (every layer, micro-batch and recompute), one head count on
    every last-stage rank: collectives inside chunks pair up. Counts above 1 that do not divide."""
    mlp = {m for r in ranks for m in r["counts"]["mlp"]}
    head = {m for r in ranks for m in r["counts"]["head"]}
    assert len(mlp) == 1 and len(head) == 1, (mlp, head)
    (m_mlp,), (m_head,) = mlp, head
    mlp_tokens, head_tokens = ranks[0]["mlp_tokens"], ranks[0]["head_tokens"]
    assert m_mlp > 1 and mlp_tokens % m_mlp, (m_mlp, mlp_tokens)
    assert m_head > 1 and head_tokens % m_head, (m_head, head_tokens)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``results(world)``: each case's per-rank results, the world run on first use (the all-to-all
    world also checks the exchange itself)."""
    runs = {}

    def world(name):
        if name not in runs:
            runs[name] = run_world(tmp_path_factory.mktemp(name), WORLDS[name], WORLD_SIZE, timeout=280,
                                   exchange=name == "a2a")
        return runs[name]

    return world


CASES = [(world, case) for world, layouts in WORLDS.items() for case in layouts]


@pytest.mark.parametrize("world, case", CASES)
def test_matches_single_rank_model(results, world, case):
    check_matches(results(world)[case], case)


@pytest.mark.parametrize("world, case", CASES)
def test_chunk_counts_agree_across_ranks(results, world, case):
    check_chunk_counts(results(world)[case])
