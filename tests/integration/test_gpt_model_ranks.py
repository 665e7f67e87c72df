"""MSTGPTModel (mini-sequence LM head + vocab-parallel cross-entropy) against stock megatron GPTModel.

Both models are built from the same config with the stock local spec and the MST one loads the stock
state dict (strict), so they differ only in how the loss is computed. Spawned ranks are slow to start
(megatron import), so each test loops over many cases inside one spawned body.
"""

import contextlib
import math

import pytest
import torch
import torch.distributed as dist

from tests.helpers import OpLog, rel_err
from tests.helpers.multirank import run_on_ranks

VOCAB = 256
B, S = 3, 29  # b * s = 87 tokens: no M in {2, 7, 32} divides S or b * s
MINI_SEQUENCES = (1, 2, 7, 32)
LOSS_TOL, GRAD_TOL = 1e-5, 1e-4
# bf16: both models run the logits GEMM in bf16 and the softmax statistics in fp32, so they differ
# by rounding only (bf16 unit roundoff 2^-9 ~ 2e-3): MST sums the chunks' dW in fp32 and rounds once,
# stock rounds one bf16 GEMM; every upstream gradient inherits that. Measured over 4 seeds, tied and
# not: loss 0 (bit-identical here), final hidden grad <= 6e-4, parameter grads <= 5.3e-3.
BF16_LOSS_TOL, BF16_GRAD_TOL = 3e-3, 1.5e-2


def assert_close(case, what, actual, expected, tol):
    assert actual.shape == expected.shape, f"{case}: {what} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{case}: {what} rel. error {err:.3g} > {tol:g}"


def batch(seed=0, b=B, s=S):
    """tokens, positions, labels [b, s] and a non-uniform loss weighting with zeros (a loss mask)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    weights = torch.rand(b, s, generator=g) * (torch.rand(b, s, generator=g) > 0.3)
    return tokens, torch.arange(s).expand(b, s), labels, weights


def build_pair(config, tied, mini_sequences):
    """(stock, mst): same config and weights; only the LM head differs."""
    from tests.helpers.models import mst_head_gpt, stock_gpt

    stock = stock_gpt(config, vocab_size=VOCAB, seq_length=S, tied=tied)
    mst = mst_head_gpt(config, mini_sequences, vocab_size=VOCAB, seq_length=S, tied=tied)
    mst.load_state_dict(stock.state_dict(), strict=True)
    return stock, mst


def ddp(config, model, overlap_grad_reduce=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce)
    return DistributedDataParallel(config, ddp_config, model)


def train_step(model, tokens, positions, labels, weights):
    """One DDP step with a weighted per-token loss: (loss [b, s], grad of the final norm output, main_grads)."""
    model.zero_grad_buffer()
    hidden_grad = []

    def keep_grad(module, inputs, output):
        output.register_hook(hidden_grad.append)

    handle = model.module.decoder.final_layernorm.register_forward_hook(keep_grad)
    loss = model(tokens, positions, None, labels=labels)
    handle.remove()
    ((loss.float() * weights).sum() / weights.sum()).backward()
    main_grads = {name: p.main_grad.clone() for name, p in model.module.named_parameters()}
    return loss.detach(), hidden_grad[0], main_grads


def compare_training(case, config, tied, mini_sequences, loss_tol=LOSS_TOL, grad_tol=GRAD_TOL):
    """Loss, final-hidden gradient and every parameter's DDP main_grad: MST vs stock."""
    stock, mst = build_pair(config, tied, mini_sequences)
    inputs = batch()
    ref_loss, ref_dh, ref_grads = train_step(ddp(config, stock), *inputs)
    loss, dh, grads = train_step(ddp(config, mst), *inputs)
    assert loss.dtype == torch.float32, f"{case}: loss dtype {loss.dtype}"
    assert dh.dtype == ref_dh.dtype, f"{case}: hidden grad dtype {dh.dtype} != {ref_dh.dtype}"
    assert_close(case, "loss", loss, ref_loss, loss_tol)
    assert_close(case, "final hidden grad", dh, ref_dh, grad_tol)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        # A doubled or missing head/embedding gradient would show here (off by 100%).
        assert_close(case, f"main_grad of {name}", grads[name], ref, grad_tol)


def accumulate_two_steps(model):
    """Two steps of three micro-batches (mean, mean, weighted loss) into DDP's main_grad with
    overlapped gradient reduction; after each step (its losses, every main_grad by name)."""
    results = []
    for step in range(2):
        model.zero_grad_buffer()
        losses = []
        for micro in range(3):
            tokens, positions, labels, weights = batch(seed=10 * step + micro)
            if micro < 2:
                weights = torch.ones_like(weights)
            with model.no_sync() if micro < 2 else contextlib.nullcontext():
                loss = model(tokens, positions, None, labels=labels)
                ((loss.float() * weights).sum() / weights.sum()).backward()
            losses.append(loss.detach())
        model.finish_grad_sync()
        results.append((losses, {n: p.main_grad.clone() for n, p in model.module.named_parameters()}))
    return results


def check_accumulation_into_main_grad(case, config, tied, bf16_config=None):
    """Gradient accumulation over micro-batches and steps (:func:`accumulate_two_steps`), MST vs stock.
    MST's head adds into main_grad (forward's expected upstream value 0, right, then wrong for the
    weighted loss) and hands DDP's hook a placeholder: a gradient added twice or lost, or a hook not
    fired (DDP's finish_grad_sync raises), would show. fp32: MST within 1e-4 of stock. With
    ``bf16_config``: both models in bf16 from the fp32 pair's weights, every MST main_grad no further
    from the fp32 one than twice stock's bf16 error plus one bf16 unit (2^-8 of its max)."""
    stock, mst = build_pair(config, tied, 7)
    runs = {"stock": stock, "mst": mst}
    if bf16_config is not None:
        stock16, mst16 = build_pair(bf16_config, tied, 7)
        for model in (stock16, mst16):
            model.load_state_dict(stock.state_dict())
        runs.update(stock16=stock16, mst16=mst16)
    mst_heads = [m.shared_embedding_or_output_weight() if tied else m.output_layer.weight
                 for name, m in runs.items() if name.startswith("mst")]
    results = {name: accumulate_two_steps(ddp(model.config, model, overlap_grad_reduce=True))
               for name, model in runs.items()}
    for step in range(2):
        at = f"{case} step {step}"
        (ref_losses, ref_grads), (losses, grads) = results["stock"][step], results["mst"][step]
        for i in range(3):
            assert_close(at, f"loss of micro-batch {i}", losses[i], ref_losses[i], LOSS_TOL)
        for name, ref in ref_grads.items():
            assert_close(at, f"main_grad of {name}", grads[name], ref, GRAD_TOL)
        if bf16_config is None:
            continue
        (stock_losses, stock_grads), (mst_losses, mst_grads) = results["stock16"][step], results["mst16"][step]
        for i in range(3):
            assert_close(at, f"bf16 loss of micro-batch {i}", mst_losses[i], stock_losses[i], BF16_LOSS_TOL)
        for name, truth in ref_grads.items():
            limit = 2 * rel_err(stock_grads[name], truth) + 2**-8
            assert rel_err(mst_grads[name], truth) <= limit, f"{at}: bf16 main_grad of {name}"
    for weight in mst_heads:
        assert weight.grad is None and weight.grad_added_to_main_grad, case


def check_one_chunk_of_logits(config, mini_sequences):
    """With labels, forward + backward never produce more than one chunk of logits at once."""
    stock, mst = build_pair(config, False, mini_sequences)
    tokens, positions, labels, weights = batch()
    chunk_rows = math.ceil(B * S / mini_sequences)
    for model, limit in ((mst, chunk_rows), (stock, B * S)):
        with OpLog(width=VOCAB) as seen:
            (model(tokens, positions, None, labels=labels) * weights).sum().backward()
        assert seen.rows == limit, f"{type(model).__name__}: {seen.rows} rows of logits at once, expected {limit}"


def check_logits_paths_unchanged(config, tied):
    """Without labels, and in inference, MST returns exactly what stock returns."""
    from megatron.core.inference.contexts import StaticInferenceContext

    stock, mst = build_pair(config, tied, 7)
    tokens, positions, labels, _ = batch()
    for gather in (None, True):
        ref = stock(tokens, positions, None, runtime_gather_output=gather)
        assert torch.equal(mst(tokens, positions, None, runtime_gather_output=gather), ref), gather
    # megatron's KV cache allocates on CUDA, so on CPU the inference branch is checked at
    # _postprocess, the only place MST changes: eval mode + an inference context takes the stock path.
    hidden = torch.randn(S, B, config.hidden_size)
    for model in (stock, mst):
        model.eval()
    for label in (None, labels):
        context = StaticInferenceContext(B, S)
        context.materialize_only_last_token_logits = label is None  # a loss needs every position
        ref, got = (
            model._postprocess(
                hidden_states=hidden, input_ids=tokens, position_ids=positions, labels=label,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, runtime_gather_output=True,
                inference_context=context,
            )
            for model in (stock, mst)
        )
        assert torch.equal(got, ref), f"inference, labels given: {label is not None}"


def check_checkpoint_keys(config, tied):
    stock, mst = build_pair(config, tied, 2)
    assert list(mst.state_dict()) == list(stock.state_dict())
    assert list(mst.sharded_state_dict()) == list(stock.sharded_state_dict())


def check_bad_labels(config):
    _, mst = build_pair(config, False, 7)
    tokens, positions, labels, _ = batch()
    out_of_range = (labels.clone().index_put_((torch.tensor(1), torch.tensor(5)), torch.tensor(VOCAB)),
                    labels.clone().index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(-1)))
    for bad in out_of_range:
        with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 256\)"):
            mst(tokens, positions, None, labels=bad)
    for bad in (labels[:, :-1], labels.t().contiguous(), labels.reshape(-1)):
        with pytest.raises(ValueError, match=r"labels must have the shape of the input ids \[b, s\] = \[3, 29\]"):
            mst(tokens, positions, None, labels=bad)


def _one_rank_body():
    import mst_megatron
    from tests.helpers.models import tiny_config

    mst_megatron.init_parallel()
    config = tiny_config()
    for tied in (False, True):
        for m in (*MINI_SEQUENCES, "auto"):
            compare_training(f"TP=1 tied={tied} M={m}", config, tied, m)
        check_logits_paths_unchanged(config, tied)
        check_checkpoint_keys(config, tied)
    bf16 = tiny_config(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    compare_training("TP=1 bf16 M=7", bf16, True, 7, BF16_LOSS_TOL, BF16_GRAD_TOL)
    for tied in (False, True):
        check_accumulation_into_main_grad(f"TP=1 accumulation tied={tied}", config, tied, bf16)
    check_one_chunk_of_logits(config, 7)
    check_bad_labels(config)


def test_one_rank_matches_stock_ddp_bf16_logits_and_errors():
    run_on_ranks(_one_rank_body, 1)


def _sequence_parallel_head(mini_sequences, mean_loss):
    """Head level under TP=2 + SP: stock's own SP output layer + cross-entropy vs the MST head, for a
    plain mean loss (nothing to correct in backward) or the non-uniform weighted loss.

    (A whole stock model cannot run SP here: the local spec's WrappedTorchNorm refuses it.)
    """
    from megatron.core import tensor_parallel
    from megatron.core.parallel_state import get_tensor_model_parallel_rank

    from mst_megatron.modules.lm_head import MiniSequenceLMHead
    from tests.helpers.models import tiny_config

    config = tiny_config(sequence_parallel=True)

    def head():
        return tensor_parallel.ColumnParallelLinear(
            config.hidden_size, VOCAB, config=config, init_method=config.init_method, bias=False
        )

    stock = head()
    mst = head()
    mst.load_state_dict(stock.state_dict())
    MiniSequenceLMHead.adopt(mst, mini_sequences)
    _, _, labels, weights = batch(seed=1, s=S + 1)  # SP needs s divisible by TP
    if mean_loss:
        weights = torch.full_like(weights, 1.0 / weights.numel())
    hidden = torch.randn(S + 1, B, config.hidden_size, generator=torch.Generator().manual_seed(2))
    shard = hidden.chunk(2)[get_tensor_model_parallel_rank()]

    def run(layer, loss_fn):
        x = shard.clone().requires_grad_()
        loss = loss_fn(layer, x)
        (loss * weights).sum().backward()
        return loss.detach(), x.grad, layer.weight.grad

    def stock_loss(layer, x):  # what GPTModel does: logits, then compute_language_model_loss
        logits, _ = layer(x)
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()

    ref = run(stock, stock_loss)
    got = run(mst, lambda layer, x: layer(x, labels=labels)[0])
    case = f"TP=2+SP head M={mini_sequences} mean loss {mean_loss}"
    for what, actual, expected, tol in zip(
        ("loss", "hidden shard grad", "head weight grad"), got, ref, (LOSS_TOL, GRAD_TOL, GRAD_TOL)
    ):
        assert_close(case, what, actual, expected, tol)


def _tensor_parallel_body():
    import mst_megatron
    from megatron.core import parallel_state
    from tests.helpers.models import tiny_config

    mst_megatron.init_parallel(tensor_model_parallel_size=2)
    config = tiny_config()
    for tied in (False, True):
        for m in (*MINI_SEQUENCES, "auto"):
            compare_training(f"TP=2 tied={tied} M={m}", config, tied, m)
        check_logits_paths_unchanged(config, tied)
        bf16 = tiny_config(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
        check_accumulation_into_main_grad(f"TP=2 accumulation tied={tied}", config, tied, bf16)
    # Labels with runtime_gather_output: MST keeps the vocab-parallel loss; stock's gathered logits
    # give loss + log(TP) (megatron issue 7452).
    stock, mst = build_pair(config, False, 7)
    tokens, positions, labels, _ = batch()
    parallel = mst(tokens, positions, None, labels=labels)
    assert torch.equal(mst(tokens, positions, None, labels=labels, runtime_gather_output=True), parallel)
    gathered = stock(tokens, positions, None, labels=labels, runtime_gather_output=True)
    assert_close("stock TP=2 gathered", "loss - log 2", gathered - math.log(2), parallel, LOSS_TOL)
    for m in MINI_SEQUENCES:
        for mean_loss in (False, True):
            _sequence_parallel_head(m, mean_loss)
    parallel_state.destroy_model_parallel()


def _pipeline_body():
    """PP=2 through megatron's schedule and finalize_model_grads (tied: embedding-group all-reduce)."""
    import mst_megatron
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads
    from tests.helpers.models import mst_head_gpt, stock_gpt, tiny_config
    from tests.helpers.training import fixed_batches, forward_backward

    mst_megatron.init_parallel(pipeline_model_parallel_size=2)
    tokens, labels = fixed_batches(2, micro_batch_size=B, seq_length=S, vocab_size=VOCAB)
    last_stage = parallel_state.is_pipeline_last_stage()
    for tied in (False, True):
        for m in (1, 7):
            case = f"PP=2 tied={tied} M={m}"
            config = tiny_config()
            config.finalize_model_grads_func = finalize_model_grads
            stock = stock_gpt(config, vocab_size=VOCAB, seq_length=S, tied=tied)
            mst = mst_head_gpt(config, m, vocab_size=VOCAB, seq_length=S, tied=tied)
            mst.load_state_dict(stock.state_dict(), strict=True)
            results = []
            for model in (ddp(config, stock), ddp(config, mst)):
                model.zero_grad_buffer()
                loss = forward_backward([model], tokens, labels)
                results.append((loss, {n: p.main_grad.clone() for n, p in model.module.named_parameters()}))
            (ref_loss, ref_grads), (loss, grads) = results
            if last_stage:
                assert abs(loss - ref_loss) <= LOSS_TOL * abs(ref_loss), (case, loss, ref_loss)
            for name, ref in ref_grads.items():
                assert_close(case, f"main_grad of {name}", grads[name], ref, GRAD_TOL)
            if tied:  # the two copies of the shared weight got the same (summed) gradient
                key = "output_layer.weight" if last_stage else "embedding.word_embeddings.weight"
                copies = [torch.empty_like(grads[key]) for _ in range(2)]
                dist.all_gather(copies, grads[key])
                assert torch.equal(copies[0], copies[1]), case
    parallel_state.destroy_model_parallel()


def _layer_spec_under_sp_body():
    """A layer spec given to MSTGPTModel under SP: built into a block with the SP-aware final norm,
    the same model as the block spec's (state dict, loss)."""
    import mst_megatron
    from megatron.core import parallel_state

    from mst_megatron import MSTGPTModel, get_gpt_mst_layer_spec
    from mst_megatron.modules.norm import RMSNorm
    from tests.helpers.models import mst_full_gpt, tiny_config

    S = 30  # divisible by TP under SP
    mst_megatron.init_parallel(tensor_model_parallel_size=2)
    config = tiny_config(sequence_parallel=True)
    from_layer = MSTGPTModel(config, get_gpt_mst_layer_spec(), VOCAB, S, position_embedding_type="rope")
    from_block = mst_full_gpt(config, vocab_size=VOCAB, seq_length=S)
    assert isinstance(from_layer.decoder.final_layernorm, RMSNorm)
    from_layer.load_state_dict(from_block.state_dict(), strict=True)
    tokens = torch.randint(0, VOCAB, (2, S), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(S).expand(2, S)
    losses = [m(tokens, positions, None, labels=tokens) for m in (from_layer, from_block)]
    assert torch.equal(losses[0], losses[1])
    parallel_state.destroy_model_parallel()


def _two_rank_body():
    _tensor_parallel_body()
    _pipeline_body()
    _layer_spec_under_sp_body()


def test_two_ranks_tp2_sp_head_and_pp2_match_stock():
    run_on_ranks(_two_rank_body, 2)
