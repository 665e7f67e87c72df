"""Ring (``cp_comm_type="p2p"``) and hierarchical (``"a2a+p2p"``) context parallelism for MST models,
the whole MST model against the single-rank stock model, exactly as ``test_context_parallel`` checks
the all-to-all (same reference, tolerances and chunk-count checks). Most layouts use a model of 2
attention heads and 1 or 2 K/V groups, which no all-to-all layout could split past CP 2."""

import pytest

from tests.test_context_parallel import FULL_RECOMPUTE, SP, check_chunk_counts, check_matches, run_world

RING = dict(cp_comm_type="p2p")
TWO_HEADS = dict(num_attention_heads=2, num_query_groups=1)
LAYOUTS = {
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
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_world(tmp_path_factory.mktemp("ring"), LAYOUTS, 4, timeout=280)


@pytest.mark.parametrize("case", LAYOUTS)
def test_matches_single_rank_model(results, case):
    check_matches(results[case], case)


@pytest.mark.parametrize("case", LAYOUTS)
def test_chunk_counts_agree_across_ranks(results, case):
    check_chunk_counts(results[case])
