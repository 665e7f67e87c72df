"""MiniSequenceMLP against megatron-core's MLP (one rank, in process): exactness for gated/plain,
with/without bias, any chunk count; the chunk-count rule; memory; bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from mst_megatron.measure.flops import GemmLog
from mst_megatron.measure.memory import format_bytes, measure_peak
from tests.helpers import rel_err
from tests.helpers.models import tiny_config

S = 37  # prime: no chunk count > 1 divides it


pytestmark = pytest.mark.usefixtures("one_rank")


def build(config, mlp_mini_sequences=None):
    """Stock ``MLP`` when ``mlp_mini_sequences`` is None, else ``MiniSequenceMLP``, via their specs."""
    from megatron.core.transformer.spec_utils import build_module

    from mst_megatron.specs.gpt_layer_specs import get_mlp_spec

    return build_module(get_mlp_spec(config, mlp_mini_sequences), config=config)


def mlp_config(gated, bias, **kw):
    act = dict(activation_func=F.silu) if gated else dict(activation_func=F.gelu)
    return tiny_config(gated_linear_unit=gated, add_bias_linear=bias, **act, **kw)


def fwd_bwd(mlp, x, g):
    """Forward + backward through ``out + bias`` (what megatron's bias-dropout-add does)."""
    mlp.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out, bias = mlp(x)
    (out if bias is None else out + bias).backward(g)
    return out.detach(), bias, x.grad, {n: p.grad for n, p in mlp.named_parameters()}


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("m", [1, 2, 3, 8, S])
@pytest.mark.parametrize("gated,bias", [(True, False), (True, True), (False, True), (False, False)],
                         ids=["swiglu", "swiglu-bias", "gelu-bias", "gelu"])
def test_matches_stock_mlp(gated, bias, m, b):
    config = mlp_config(gated, bias)
    torch.manual_seed(0)
    stock = build(config)
    mst = build(config, m)
    mst.load_state_dict(stock.state_dict(), strict=True)
    x, g = torch.randn(S, b, config.hidden_size), torch.randn(S, b, config.hidden_size)
    out_ref, bias_ref, xg_ref, pg_ref = fwd_bwd(stock, x, g)
    out, bias_out, xg, pg = fwd_bwd(mst, x, g)
    # (output, bias) exactly like MLP: the un-added fc2 bias parameter itself, or None
    assert (bias_out is None) == (not bias) and (bias_ref is None) == (not bias)
    if bias:
        assert bias_out is mst.linear_fc2.bias
    assert out.shape == out_ref.shape and rel_err(out, out_ref) <= 1e-6
    assert rel_err(xg, xg_ref) <= 1e-5
    assert pg.keys() == pg_ref.keys()
    for n in pg_ref:
        assert rel_err(pg[n], pg_ref[n]) <= 1e-5, n


@pytest.mark.parametrize("gated", [True, False], ids=["swiglu", "gelu"])
def test_recompute_skips_fc2_gemm(gated):
    """Per chunk: forward fc1 + fc2; backward recomputes fc1 only, then fc2 and fc1 dgrad + wgrad."""
    m = 3
    mlp = build(mlp_config(gated, bias=True), m)
    x = torch.randn(S, 2, 64, requires_grad=True)
    with GemmLog() as forward:
        out, bias = mlp(x)
    with GemmLog() as backward:
        (out + bias).sum().backward()
    assert (forward.count, backward.count) == (2 * m, 5 * m)


def fc1_calls(mlp, x):
    calls = []
    handle = mlp.linear_fc1.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].size(0)))
    with torch.no_grad():
        mlp(x)
    handle.remove()
    return calls


@pytest.mark.parametrize(
    "m,length,expected",
    [
        ("auto", 200, [50, 50, 50, 50]),  # ceil(200 / hidden 64) = 4
        ("auto", 64, [64]),  # one hidden_size of tokens: the stock path
        ("auto", 10, [10]),
        (3, 10, [4, 3, 3]),  # every token kept, near-equal chunks
        (50, 10, [1] * 10),  # clamped to one token per chunk
        (1, 200, [200]),
    ],
)
def test_chunk_count(m, length, expected):
    mlp = build(tiny_config(), m)
    assert mlp.num_chunks(length) == len(expected)
    assert fc1_calls(mlp, torch.randn(length, 2, 64)) == expected


def test_auto_rule_formula():
    mlp = build(tiny_config(hidden_size=96, num_attention_heads=4, kv_channels=24), "auto")
    for length in (1, 95, 96, 97, 1000, 4096):
        assert mlp.num_chunks(length) == min(length, math.ceil(length / 96))


def test_sharded_state_dict_same_as_mlp():
    from megatron.core import parallel_state as ps

    config = mlp_config(gated=True, bias=True)
    stock, mst = build(config), build(config, 4)
    metadata = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    a = stock.sharded_state_dict("mlp.", metadata=metadata)
    b = mst.sharded_state_dict("mlp.", metadata=metadata)
    assert a.keys() == b.keys() and {"mlp.linear_fc1.weight", "mlp.linear_fc2.bias"} <= a.keys()
    for k in a:
        assert type(a[k]) is type(b[k]) and a[k].key == b[k].key, k


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8", "Auto", True])
def test_bad_chunk_count(bad):
    with pytest.raises(ValueError, match="mlp_mini_sequences"):
        build(tiny_config(), bad)


@pytest.mark.parametrize(
    "override,name",
    [(dict(tp_comm_overlap=True), "tp_comm_overlap"), (dict(num_moe_experts=4), "num_moe_experts")],
)
def test_refused_configs(override, name):
    with pytest.raises(ValueError, match=name):
        build(tiny_config(**override), 4)


def test_megatron_fine_grained_offloading_refused():
    """megatron's fine_grained_activation_offloading (a field in 0.16.1 and 0.19.2) is refused by the
    MST MLP and so by a model built with the MST spec, naming the flag; the stock model accepts it."""
    from tests.helpers.models import mst_full_gpt, stock_gpt

    config = tiny_config(fine_grained_activation_offloading=True, offload_modules=["core_attn"])
    with pytest.raises(ValueError, match="fine_grained_activation_offloading=True"):
        build(config, 4)
    with pytest.raises(ValueError, match="fine_grained_activation_offloading=True"):
        mst_full_gpt(config)
    stock_gpt(config)


def test_per_token_scale_refused_when_chunking():
    mlp = build(tiny_config(), 4)
    with pytest.raises(ValueError, match="per_token_scale"):
        mlp(torch.randn(16, 1, 64), per_token_scale=torch.ones(16, 1))


def _peak_above_floor(mlp, x, g):
    kept = {}

    def step():
        out, _ = mlp(x)
        out.backward(g)
        kept["out"] = out

    peak = measure_peak(step, (mlp, x, g))
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    weights = sum(nbytes(p) for p in mlp.parameters())
    floor = 2 * weights + nbytes(x) + nbytes(g) + nbytes(kept["out"]) + nbytes(x.grad)
    mlp.zero_grad(set_to_none=True)
    x.grad = None
    return peak["total"] - floor


def test_memory_above_floor():
    """SwiGLU h=128, ffn=448 (Llama's 3.5 ratio), S=2048, M=8: forward+backward peak above the floor
    (weights, their grads, input, upstream grad, output, input grad) <= 1/4 of the stock MLP's."""
    config = tiny_config(hidden_size=128, ffn_hidden_size=448, num_attention_heads=4)
    torch.manual_seed(0)
    stock = build(config)
    mst = build(config, 8)
    mst.load_state_dict(stock.state_dict())
    x = torch.randn(2048, 1, 128, requires_grad=True)
    g = torch.randn(2048, 1, 128)
    stock_excess, mst_excess = _peak_above_floor(stock, x, g), _peak_above_floor(mst, x, g)
    assert mst_excess <= stock_excess / 4, (format_bytes(mst_excess), format_bytes(stock_excess))
