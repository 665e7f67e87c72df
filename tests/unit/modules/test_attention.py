"""SDPAttention against megatron-core's DotProductAttention: same math, no [b, heads, s, s] scores,
dropout from megatron's RNG tracker, clear errors for what it does not support."""

import pytest
import torch

from mst_megatron.measure.memory import measure_peak
from tests.helpers import rel_err
from tests.helpers.models import tiny_config


pytestmark = pytest.mark.usefixtures("one_rank")


def attention(cls_name, config, mask_type="causal"):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from mst_megatron.modules.attention import SDPAttention

    cls = {"stock": DotProductAttention, "sdpa": SDPAttention}[cls_name]
    return cls(config=config, layer_number=1, attn_mask_type=AttnMaskType[mask_type], attention_type="self")


def qkv(s, b, heads, groups, head_dim, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    make = lambda n: torch.randn(s, b, n, head_dim, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(heads), make(groups), make(groups)


def run(module, q, k, v):
    for t in (q, k, v):
        t.grad = None
    out = module(q, k, v, None)
    out.backward(torch.ones_like(out) / out.numel() + out.detach())
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


@pytest.mark.parametrize("mask_type", ["causal", "no_mask"])
@pytest.mark.parametrize("heads,groups,b", [(4, 2, 2), (4, 4, 1), (4, 1, 2)], ids=["gqa", "mha", "mqa"])
def test_matches_dot_product_attention(heads, groups, b, mask_type):
    config = tiny_config(num_attention_heads=heads, num_query_groups=groups)
    q, k, v = qkv(37, b, heads, groups, config.kv_channels)
    out_ref, grads_ref = run(attention("stock", config, mask_type), q, k, v)
    out, grads = run(attention("sdpa", config, mask_type), q, k, v)
    assert out.shape == out_ref.shape == (37, b, heads * config.kv_channels)
    assert rel_err(out, out_ref) <= 1e-5
    for g, r in zip(grads, grads_ref):
        assert rel_err(g, r) <= 1e-5


def test_bf16_close_to_fp32():
    config = tiny_config(num_attention_heads=8, num_query_groups=2, bf16=True, params_dtype=torch.bfloat16)
    q, k, v = qkv(64, 2, 8, 2, config.kv_channels)
    out32, _ = run(attention("sdpa", config), q, k, v)
    out16, _ = run(attention("sdpa", config), *(t.detach().bfloat16().requires_grad_() for t in (q, k, v)))
    assert out16.dtype == torch.bfloat16 and rel_err(out16, out32) <= 2e-2  # a few bf16 ulps (2^-8)


def test_no_quadratic_scores():
    """S=2048, 8 heads, GQA 8:2: forward+backward peak far below one fp32 [b, heads, s, s] tensor."""
    s, heads, groups, head_dim = 2048, 8, 2, 16
    config = tiny_config(num_attention_heads=heads, num_query_groups=groups, kv_channels=head_dim)
    q, k, v = qkv(s, 1, heads, groups, head_dim)
    module = attention("sdpa", config)
    peak = measure_peak(lambda: module(q, k, v, None).sum().backward(), (q, k, v))
    scores_bytes = heads * s * s * 4  # 128 MiB
    assert peak["total"] < scores_bytes / 16, peak


def test_dropout_draws_from_rng_tracker():
    """Training dropout runs inside megatron's tracker fork: the default generator is untouched, the
    tracker's stream advances, and megatron's recompute replays the same mask (same gradients)."""
    from megatron.core import tensor_parallel

    config = tiny_config(attention_dropout=0.5)
    module = attention("sdpa", config)
    q, k, v = qkv(32, 2, 4, 2, config.kv_channels)
    tracker = tensor_parallel.get_cuda_rng_tracker()

    module.eval()
    out_eval = module(q, k, v, None)
    module.train()
    default_before, tracker_before = torch.get_rng_state(), tracker.get_states()
    with pytest.warns(UserWarning, match="math kernel"):
        out_ref, grads_ref = run(module, q, k, v)
    assert torch.equal(torch.get_rng_state(), default_before)
    assert not torch.equal(tracker.get_states()["model-parallel-rng"], tracker_before["model-parallel-rng"])
    assert not torch.allclose(out_ref, out_eval)

    tracker.set_states(tracker_before)
    for t in (q, k, v):
        t.grad = None
    out = tensor_parallel.checkpoint(module, False, q, k, v, None)
    out.backward(torch.ones_like(out) / out.numel() + out.detach())
    assert torch.equal(out.detach(), out_ref)
    for t, r in zip((q, k, v), grads_ref):
        assert torch.equal(t.grad, r)


@pytest.mark.parametrize(
    "override,match",
    [
        # a config whose CP size is not the parallel state's (this one-rank world has no CP group of 2)
        (dict(context_parallel_size=2),
         "context_parallel_size=2 in the config, but the context-parallel process group has 1 ranks"),
        (dict(softmax_type="learnable"), "softmax_type"),
        (dict(window_size=(16, 0)), "window_size"),
    ],
)
def test_refused_configs(override, match):
    with pytest.raises(ValueError, match=match):
        attention("sdpa", tiny_config(**override))


@pytest.mark.parametrize("mask_type", ["padding", "arbitrary", "padding_causal", "causal_bottom_right"])
def test_refused_mask_types(mask_type):
    with pytest.raises(ValueError, match="attn_mask_type"):
        attention("sdpa", tiny_config(), mask_type)


def test_refused_forward_arguments():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    module = attention("sdpa", tiny_config())
    q, k, v = qkv(8, 1, 4, 2, 16)
    with pytest.raises(ValueError, match="packed_seq_params"):
        module(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(ValueError, match="attention_bias"):
        module(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="attn_mask_type"):
        module(q, k, v, None, attn_mask_type=AttnMaskType.padding)
    with pytest.raises(ValueError, match="as many queries as keys"):
        module(q[:4], k, v, None)
