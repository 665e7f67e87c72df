"""The MST layer spec against megatron-core's local spec: state dicts, exactness through megatron's
schedule at TP=1 (the two-rank layouts: tests/integration/test_layer_spec_ranks.py), bf16, errors.

Exactness: the stock ``GPTModel`` (``get_gpt_layer_local_spec()``) and the MST one are built from one
config, the stock ``state_dict()`` is loaded into the MST model with ``strict=True``, and one global
batch goes through megatron's schedule. fp32 tolerances: loss relative error <= 1e-5, every parameter
gradient within 1e-4 of the reference's max abs. The two differ only by float rounding (SDPA vs the
stock softmax attention, chunk-sized GEMMs), which these bounds hold with two orders of margin.
"""

import pytest
import torch

import mst_megatron
from tests.helpers.layer_compare import GRAD_TOL, LOSS_TOL, RECOMPUTE, check, compare, sweep
from tests.helpers.models import mst_gpt, stock_gpt, tiny_config
from tests.helpers.training import (
    assert_bf16_grads_as_close_as_stock,
    fixed_batches,
    forward_backward,
    grad_error,
    grads_by_name,
)


pytestmark = pytest.mark.usefixtures("one_rank")


@pytest.mark.parametrize("s,m,b", sweep((24, 25), (1, 2)))
def test_exact_tp1(s, m, b):
    check([compare("tp1", m, s, b, num_microbatches=2)])


def test_exact_tp1_layernorm_gelu_bias_qk_norm():
    """Plain (non-gated) GeLU MLP with biases, LayerNorm, qk-layernorm, full recompute."""
    import torch.nn.functional as F

    kw = dict(normalization="LayerNorm", gated_linear_unit=False, activation_func=F.gelu,
              add_bias_linear=True, qk_layernorm=True)
    check([compare("tp1-ln", 3, 25, 2, ref=kw, mst={**kw, **RECOMPUTE["full-uniform"]})])


@pytest.mark.parametrize("m", [1, 8, "S"])
def test_bf16_tp1(m):
    """bf16 through megatron's Float16Module, S=60, against the stock model in fp32 (the truth) and
    in bf16. Tolerance: the MST loss within 1e-4 of the stock bf16 loss (relative; the loss itself
    is computed in fp32 from bf16 logits); every MST gradient no further from the fp32 gradient than
    twice the stock bf16 gradient's error plus one bf16 unit roundoff (2^-8) of the gradient's max:
    the only extra rounding is the sum over M chunks of each weight gradient, accumulated in bf16."""
    from megatron.core.transformer.module import Float16Module

    s = 60
    fp32, bf16 = tiny_config(), tiny_config(bf16=True)
    tokens, labels = fixed_batches(2, 2, s, 256)
    torch.manual_seed(0)
    truth = stock_gpt(fp32, seq_length=s)
    stock16 = stock_gpt(fp32, seq_length=s)
    mst16 = mst_gpt(fp32, s if m == "S" else m, seq_length=s)
    for model in (stock16, mst16):
        model.load_state_dict(truth.state_dict(), strict=True)
    stock16, mst16 = Float16Module(bf16, stock16), Float16Module(bf16, mst16)
    losses = [forward_backward([model], tokens, labels) for model in (truth, stock16, mst16)]
    assert abs(losses[2] - losses[1]) / abs(losses[0]) <= 1e-4, losses
    assert_bf16_grads_as_close_as_stock(truth, stock16, mst16)


@pytest.mark.parametrize("normalization,qk_layernorm", [("RMSNorm", False), ("LayerNorm", True)])
def test_state_dicts_match_local_spec(normalization, qk_layernorm):
    from megatron.core import parallel_state as ps

    config = tiny_config(normalization=normalization, qk_layernorm=qk_layernorm, add_bias_linear=True)
    stock = stock_gpt(config, qk_layernorm=qk_layernorm)
    mst = mst_gpt(config)
    sd_stock, sd_mst = stock.state_dict(), mst.state_dict()
    assert sd_stock.keys() == sd_mst.keys()
    assert all(getattr(sd_stock[k], "shape", None) == getattr(sd_mst[k], "shape", None) for k in sd_stock)
    mst.load_state_dict(sd_stock, strict=True)
    metadata = {"dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    sh_stock, sh_mst = stock.sharded_state_dict(metadata=metadata), mst.sharded_state_dict(metadata=metadata)
    assert sh_stock.keys() == sh_mst.keys()
    for k, v in sh_stock.items():
        w = sh_mst[k]
        assert type(v) is type(w) and v.key == w.key, k
        assert getattr(v, "global_shape", None) == getattr(w, "global_shape", None), k


def test_spec_uses_mst_modules():
    from mst_megatron.modules.attention import SDPAttention
    from mst_megatron.modules.norm import LayerNorm, RMSNorm
    from mst_megatron.specs.gpt_layer_specs import get_gpt_mst_layer_spec
    from megatron.core.transformer.transformer_block import TransformerBlock

    model = mst_gpt(tiny_config(), 4)
    layer = model.decoder.layers[0]
    assert type(layer.mlp) is mst_megatron.MiniSequenceMLP and layer.mlp.mlp_mini_sequences == 4
    assert type(layer.self_attention.core_attention) is SDPAttention
    norms = (layer.input_layernorm, layer.pre_mlp_layernorm, model.decoder.final_layernorm)
    assert all(type(n) is RMSNorm for n in norms)
    # A bare layer spec works in a TransformerBlock too (the block then builds megatron's final norm).
    config = tiny_config(normalization="LayerNorm")
    block = TransformerBlock(config, get_gpt_mst_layer_spec(2, normalization="LayerNorm"))
    assert type(block.layers[1].pre_mlp_layernorm) is LayerNorm
    out = block(torch.randn(10, 2, 64), attention_mask=None)
    assert out.shape == (10, 2, 64)


@pytest.mark.parametrize("normalization, qk_layernorm", [("LayerNorm", False), ("LayerNorm", True),
                                                       ("RMSNorm", True)])
def test_readme_three_lines_follow_the_config(normalization, qk_layernorm):
    """README's three lines (no normalization / qk_layernorm passed) with a plain megatron
    TransformerConfig: the layer spec takes both from the config, as the stock local spec's norms and
    the block spec do, so the model's parameters are stock's; losses match the stock model's."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mst_megatron import MSTGPTModel, get_gpt_mst_layer_spec
    from mst_megatron.modules.norm import NORMS

    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                               normalization=normalization, qk_layernorm=qk_layernorm, hidden_dropout=0.0,
                               attention_dropout=0.0, masked_softmax_fusion=False, bias_dropout_fusion=False,
                               gradient_accumulation_fusion=False, persist_layer_norm=False)
    spec = get_gpt_mst_layer_spec(mlp_mini_sequences="auto")
    model = MSTGPTModel(config, spec, 256, 32, lm_head_mini_sequences="auto")
    attention = model.decoder.layers[0].self_attention
    assert type(model.decoder.layers[0].input_layernorm) is NORMS[normalization]
    assert (type(attention.q_layernorm) is NORMS[normalization]) == qk_layernorm
    stock = GPTModel(config, get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm), 256, 32)
    model.load_state_dict(stock.state_dict(), strict=True)
    tokens, labels = fixed_batches(1, 2, 32, 256)
    assert forward_backward([model], tokens, labels) == pytest.approx(forward_backward([stock], tokens, labels),
                                                                      rel=LOSS_TOL)


@pytest.mark.parametrize("spec_kwargs, config_kwargs, match", [
    (dict(normalization="RMSNorm"), dict(normalization="LayerNorm"), "config.normalization is 'LayerNorm'"),
    (dict(qk_layernorm=False), dict(qk_layernorm=True), "config.qk_layernorm is True"),
    (dict(qk_layernorm=True), dict(qk_layernorm=False), "config.qk_layernorm is False"),
])
def test_spec_and_config_that_disagree_are_an_error(spec_kwargs, config_kwargs, match):
    from mst_megatron import MSTGPTModel, get_gpt_mst_layer_spec

    with pytest.raises(ValueError, match=match):
        MSTGPTModel(tiny_config(**config_kwargs), get_gpt_mst_layer_spec(**spec_kwargs), 256, 32)


def test_mlp_takes_the_layers_process_groups():
    """megatron-core 0.19 hands the MLP spec the layer's pg_collection: a custom TP group reaches the
    MST MLP. 0.16's TransformerLayer passes an MLP subclass only its config (the default TP group)."""
    import megatron.core
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from megatron.core.transformer.spec_utils import build_module

    from mst_megatron.specs.gpt_layer_specs import get_gpt_mst_layer_spec

    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.tp = torch.distributed.new_group([0])  # a one-rank TP group of the user's own
    layer = build_module(get_gpt_mst_layer_spec(2), config=tiny_config(), pg_collection=groups)
    assert isinstance(layer, TransformerLayer)
    if megatron.core.__version__ >= "0.19":
        assert layer.mlp.tp_group is groups.tp
    else:
        assert layer.mlp.tp_group is parallel_state.get_tensor_model_parallel_group()


def test_norms():
    from mst_megatron.modules.norm import LayerNorm, RMSNorm

    for cls, ref_cls in ((RMSNorm, torch.nn.RMSNorm), (LayerNorm, torch.nn.LayerNorm)):
        normalization = cls.__name__
        for sp in (False, True):
            # (a config, not a model: TP=2 only satisfies the config's SP check)
            config = tiny_config(
                normalization=normalization, sequence_parallel=sp, tensor_model_parallel_size=2
            )
            norm = cls(config, 64, eps=1e-6)
            assert all(p.sequence_parallel is sp for p in norm.parameters())
            ref = ref_cls(64, eps=1e-6)
            ref.load_state_dict(norm.state_dict(), strict=True)
            x = torch.randn(5, 2, 64)
            assert torch.equal(norm(x), ref(x))
        other = "LayerNorm" if normalization == "RMSNorm" else "RMSNorm"
        with pytest.raises(ValueError, match="normalization"):
            cls(tiny_config(normalization=other), 64)
        with pytest.raises(ValueError, match="layernorm_zero_centered_gamma"):
            cls(tiny_config(normalization=normalization, layernorm_zero_centered_gamma=True), 64)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(backend="te"), "backend"),
        (dict(normalization="L2Norm"), "normalization"),
        (dict(mlp_mini_sequences=0), "mlp_mini_sequences"),
        (dict(mlp_mini_sequences=2.0), "mlp_mini_sequences"),
        (dict(mlp_mini_sequences=None), "mlp_mini_sequences"),
        (dict(mlp_mini_sequences="all"), "mlp_mini_sequences"),
    ],
)
def test_spec_errors(kwargs, match):
    from mst_megatron.specs.gpt_layer_specs import get_gpt_mst_layer_spec

    with pytest.raises(ValueError, match=match):
        get_gpt_mst_layer_spec(**kwargs)


@pytest.mark.parametrize(
    "override,match",
    [(dict(tp_comm_overlap=True), "tp_comm_overlap"), (dict(num_moe_experts=4), "num_moe_experts")],
)
def test_model_refuses_unsupported_configs(override, match):
    with pytest.raises(ValueError, match=match):
        mst_gpt(tiny_config(**override))


# ---------------------------------------------------------------- GEMMs under megatron's recompute

# MLP GEMM units per layer and step (SwiGLU fc1 [h, 2F] = 2 units, fc2 [F, h] = 1; forward, the
# recompute's, backward 6): stock (one mini-sequence) and MST (M > 1).
MLP_UNITS = {
    "none": dict(recompute_granularity=None, stock=9, mst=3 + 2 + 6),
    "full-uniform": dict(RECOMPUTE["full-uniform"], stock=12, mst=3 + 0 + 2 + 6),
    # 2 layers, the first checkpointed: 11 and 11 (the second is not recomputed), stock 12 and 9
    "full-block": dict(RECOMPUTE["full-block"], stock=(12 + 9) / 2, mst=3 + 0 + 2 + 6),
    # two layers per checkpoint: the first MLP's output is read by the second layer, so every MLP
    # keeps the full recompute (3) before its chunks' own (2)
    "full-uniform-2": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2,
                           stock=12, mst=3 + 3 + 2 + 6),
    "selective": dict(RECOMPUTE["selective"], stock=12, mst=3 + 3 + 2 + 6),  # unchanged by full's saving
}


@pytest.mark.parametrize("recompute", list(MLP_UNITS))
def test_mlp_gemm_units_under_recompute(recompute):
    """One step of a 2-layer model with hidden_dropout=0.1, GEMMs logged: the MLP's (told apart by
    their F or 2F dimension) sum to the units above times L x 2 T h F, every other GEMM is the same
    as stock+SDPA's (MST spec, one mini-sequence), and loss and gradients match megatron's local spec
    with the same dropout masks (dropout is on: the loss differs from the dropout-free one)."""
    from mst_megatron.measure.flops import GemmLog

    kw = dict(MLP_UNITS[recompute])
    units = {"stock": kw.pop("stock"), "mst": kw.pop("mst")}
    s, b, ffn = 37, 2, 160
    config = tiny_config(hidden_dropout=0.1, ffn_hidden_size=ffn, **kw)
    tokens, labels = fixed_batches(1, b, s, 256)
    torch.manual_seed(0)
    ref = stock_gpt(config, seq_length=s)
    models = {"stock": mst_gpt(config, 1, seq_length=s), "mst": mst_gpt(config, 3, seq_length=s)}
    logs, losses, grads = {}, {}, {}
    for name, model in [("ref", ref), *models.items()]:
        model.load_state_dict(ref.state_dict(), strict=True)
        torch.manual_seed(1)  # the dropout masks
        with GemmLog() as logs[name]:
            losses[name] = forward_backward([model], tokens, labels)
        grads[name] = grads_by_name([model])
    is_mlp = lambda mkn: ffn in mkn or 2 * ffn in mkn  # noqa: E731
    unit = 2 * s * b * config.hidden_size * ffn
    for name, expected in units.items():
        assert logs[name].flops(is_mlp) == expected * config.num_layers * unit, (name, logs[name].flops(is_mlp) / unit)
        assert losses[name] == pytest.approx(losses["ref"], rel=LOSS_TOL), name
        assert grad_error(grads[name], grads["ref"]) <= GRAD_TOL, name
    others = [sorted(mkn for mkn in logs[name].gemms if not is_mlp(mkn)) for name in units]
    assert others[0] == others[1]
    torch.manual_seed(1)
    no_dropout = stock_gpt(tiny_config(ffn_hidden_size=ffn, **kw), seq_length=s)
    no_dropout.load_state_dict(ref.state_dict(), strict=True)
    assert abs(forward_backward([no_dropout], tokens, labels) - losses["ref"]) > 1e-3
