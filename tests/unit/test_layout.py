"""The parallel layout: degrees validated once, one error type, the sequence divisor, the CP head rule,
and the chunk-count rules (no megatron-core needed)."""

import pytest

from mst_megatron.layout import LayoutError, ParallelLayout, head_chunk_count, mlp_chunk_count


def test_for_world_derives_data_parallelism():
    x = ParallelLayout.for_world(32, tp=2, pp=2, cp=4, sp=True)
    assert (x.dp, x.world_size, x.sp_size, x.a2a_size, x.ring_size) == (2, 32, 2, 4, 1)
    ring = ParallelLayout.for_world(8, cp=8, cp_comm_type="p2p")
    assert (ring.a2a_size, ring.ring_size) == (1, 8)
    both = ParallelLayout.for_world(8, cp=8, cp_comm_type="a2a+p2p", hierarchical_cp_sizes=[2, 4])
    assert (both.a2a_size, both.ring_size, both.hierarchical_cp_sizes) == (2, 4, (2, 4))


@pytest.mark.parametrize("tp, cp, sp, divisor", [(1, 1, False, 1), (4, 1, True, 4), (1, 4, False, 8),
                                                  (2, 4, True, 8), (8, 2, True, 16), (8, 2, False, 4)])
def test_seq_len_divisor(tp, cp, sp, divisor):
    x = ParallelLayout(tp=tp, cp=cp, sp=sp)
    assert x.seq_len_divisor == divisor
    x.check_seq_length(3 * divisor)
    if divisor > 1:
        with pytest.raises(LayoutError, match="--seq-length"):
            x.check_seq_length(3 * divisor + 1)


@pytest.mark.parametrize("make, message", [
    (lambda: ParallelLayout.for_world(6, tp=4), r"world size 6 is not divisible by --tensor-model-parallel-size \(4\)"),
    (lambda: ParallelLayout.for_cluster(3, 8, tp=8, cp=2), r"3 nodes x 8 GPUs = 24 GPUs is not divisible by .* = 16"),
    (lambda: ParallelLayout.for_cluster(2, 4, tp=8), r"--tensor-model-parallel-size 8 must divide the 4 GPUs per node"),
    (lambda: ParallelLayout(tp=0), r"--tensor-model-parallel-size must be an int >= 1, got 0"),
    (lambda: ParallelLayout(pp=True), r"--pipeline-model-parallel-size must be an int >= 1, got True"),
    (lambda: ParallelLayout(vpp=2), r"--virtual-pipeline-model-parallel-size 2 > 1 needs --pipeline-model-parallel"),
    (lambda: ParallelLayout(sp=True), r"--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (lambda: ParallelLayout(cp=2, cp_comm_type="ring"), r"--cp-comm-type must be one of \('a2a', 'p2p', 'a2a\+p2p'\)"),
    (lambda: ParallelLayout(cp=4, hierarchical_cp_sizes=(2, 2)), r"needs --cp-comm-type a2a\+p2p"),
    (lambda: ParallelLayout(cp=8, cp_comm_type="a2a+p2p", hierarchical_cp_sizes=(2, 2)),
     r"must be two sizes \(all-to-all, ring\) whose product is --context-parallel-size 8; possible: "
     r"\[\[2, 4\], \[4, 2\]\]"),
])
def test_bad_layouts_raise_one_error_type_naming_the_flag(make, message):
    with pytest.raises(LayoutError, match=message):
        make()


def test_cp_head_rule_binds_the_all_to_all_not_the_ring():
    # Llama-3-8B: 32 heads, 8 key/value groups; TP 8 leaves 4 heads and 1 group per rank.
    ParallelLayout(tp=8, cp=4).check_heads(32, 8)
    with pytest.raises(LayoutError, match=r"--context-parallel-size 8: the attention heads per tensor-parallel rank "
                                          r"\(num_attention_heads 32 / --tensor-model-parallel-size 8 = 4\)"):
        ParallelLayout(tp=8, cp=8).check_heads(32, 8)
    ParallelLayout(tp=8, cp=8, cp_comm_type="p2p").check_heads(32, 8)  # the ring: any CP
    both = ParallelLayout(tp=8, cp=16, cp_comm_type="a2a+p2p", hierarchical_cp_sizes=(4, 4))
    both.check_heads(32, 8)
    assert both.kv_replication(8) == 4  # one group per TP rank, shared by the 4 all-to-all ranks
    with pytest.raises(LayoutError, match=r"the key/value groups per tensor-parallel rank \(num_query_groups 6"):
        ParallelLayout(cp=4).check_heads(12, 6)
    with pytest.raises(LayoutError, match=r"the model's num_query_groups \(6\) is not divisible by"):
        ParallelLayout(tp=4).check_heads(12, 6)


def test_layers_split_over_stages():
    ParallelLayout(pp=4, vpp=2).check_layers(32)
    with pytest.raises(LayoutError, match=r"num_layers \(30\) is not divisible by --pipeline-model-parallel-size 4"):
        ParallelLayout(pp=4).check_layers(30)
    with pytest.raises(LayoutError, match=r"--virtual-pipeline-model-parallel-size 3 does not divide the 8 layers"):
        ParallelLayout(pp=4, vpp=3).check_layers(32)


def test_padded_vocab_size():
    assert ParallelLayout(tp=8).padded_vocab_size(128256) == 129024  # multiple of 128 x 8
    assert ParallelLayout().padded_vocab_size(128256, divisible_by=1) == 128256


def test_chunk_rules():
    # MLP auto: gathered chunks of about hidden_size tokens, never more chunks than local tokens.
    assert mlp_chunk_count("auto", 16384, 8, 4096) == 32
    assert mlp_chunk_count(7, 5, 1, 4096) == 5
    # Head auto: ceil(V / TP / h) chunks, but at least h / 4 gathered tokens each.
    assert head_chunk_count("auto", 65536, 2, 4096, 128256 // 2) == 16  # ceil(64128 / 4096)
    assert head_chunk_count("auto", 16384, 8, 4096, 128256 // 8) == 4
    assert head_chunk_count("auto", 1024, 1, 4096, 128256) == 1  # 1024 tokens = h / 4: one chunk
    with pytest.raises(ValueError, match=r"lm_head_mini_sequences must be an int >= 1 or 'auto', got 0"):
        head_chunk_count(0, 64, 1, 64, 256)
