"""MiniSequenceLMHead under megatron DDP with bf16 weights: the head's weight gradient goes straight
into DDP's fp32 main_grad, so the head's own V x h fp32 sum is gone (measured with MemTracker), and
the gradients are those of the head before (its own sum, rounded to bf16 and added by DDP's hook)."""

import pytest
import torch

from tests.helpers import rel_err

pytestmark = pytest.mark.usefixtures("one_rank")

H, V, S, B = 512, 32000, 256, 1  # a Llama-shaped head small enough to run in seconds
BF16_ROUNDING = 2.0**-8  # one bf16 rounding, as a max error relative to the largest entry (rel_err)


def own_sum(monkeypatch):
    """Force the head before this change: the op's own fp32 sum, returned to autograd (and DDP's hook)."""
    from mst_megatron.modules.lm_head import MiniSequenceLMHead

    monkeypatch.setattr(MiniSequenceLMHead, "main_grad_sum", lambda self, weight: None)


def ddp(config, module):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    return DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)


def ddp_head(mini_sequences=4):
    """A bf16 MST head (megatron's output layer, adopted) inside megatron DDP with fp32 main_grad."""
    from megatron.core import tensor_parallel

    from mst_megatron.modules.lm_head import MiniSequenceLMHead
    from tests.helpers.models import tiny_config

    torch.manual_seed(0)
    config = tiny_config(hidden_size=H, bf16=True, params_dtype=torch.bfloat16)
    layer = tensor_parallel.ColumnParallelLinear(H, V, config=config, init_method=config.init_method, bias=False)
    return ddp(config, MiniSequenceLMHead.adopt(layer, mini_sequences))


def head_step(model, hidden, labels):
    """One step with a mean loss: every token's upstream gradient 1/T, a power of two here."""
    model.zero_grad_buffer()
    hidden.grad = None
    model(hidden, labels=labels)[0].float().mean().backward()


def test_weight_gradient_into_main_grad_without_the_heads_own_sum(monkeypatch):
    """The step's peak (MemTracker) above the floor (what exists before it, and dh) falls
    by at least the V x h fp32 sum, both in the first steps (nothing expected in forward: dW formed in
    backward) and once the mean's upstream value is expected (dW formed in forward). main_grad: what
    the own sum gives, rounded to bf16 (with an exact 1/T scale, bit for bit once expected); dh equal."""
    from mst_megatron.measure.memory import format_bytes, measure_peak

    model = ddp_head()
    weight = model.module.weight
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(S, B, H, generator=g).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (B, S), generator=g)
    # What exists before the step (as tracked) and the input gradient it leaves: any head's floor.
    floor = measure_peak(lambda: None, [model, hidden, labels])["total"] + hidden.numel() * 2

    def measured_step():
        head_step(model, hidden, labels)  # the allocator warmed up by the step before
        peak = measure_peak(lambda: head_step(model, hidden, labels), [model, hidden, labels])["total"]
        return peak - floor, weight.main_grad.clone(), hidden.grad

    with monkeypatch.context() as patch:
        own_sum(patch)
        own_above, own_grad, own_dh = measured_step()
    assert weight.grad is None  # DDP's hook moved the returned gradient into main_grad
    sum_bytes = V * H * 4
    for expected in (0.0, 1.0 / (S * B)):  # the first two backwards see 1/T: expected from then on
        assert model.module.main_grad_sum(weight).expected_grad == expected
        above, grad, dh = measured_step()
        print(f"\nhead h={H} V={V} T={S * B} bf16, peak above the floor ({format_bytes(floor)}): own fp32 "
              f"sum {format_bytes(own_above)}, into main_grad (expected {expected:g}) {format_bytes(above)}, "
              f"saved {format_bytes(own_above - above)} (V x h x 4 = {format_bytes(sum_bytes)})")
        assert own_above - above >= sum_bytes - (2**17 if expected == 0 else 0), expected
        assert weight.grad is None and weight.grad_added_to_main_grad
        assert torch.equal(dh, own_dh)
        if expected:  # the same fp32 sum of chunk products, scaled exactly by 1/T
            assert torch.equal(grad.bfloat16().float(), own_grad)
        else:  # the chunk products formed in backward from pre-scaled inputs: bf16 rounding apart
            assert rel_err(grad, own_grad) <= BF16_ROUNDING


def head_weight_grad_reference(model, run, labels, upstream, tied):
    """``run()``'s head-weight gradient in fp64 from what the head (and, tied, the embedding) saw: the
    head's bf16 input and weight with the fp64 loss gradient, plus the embedding's output gradient
    scattered to its tokens (tied)."""
    from tests.helpers.cross_entropy import reference

    seen = {}
    module = model.module
    hooks = [module.output_layer.register_forward_pre_hook(lambda m, args: seen.update(head_input=args[0]))]
    if tied:
        def keep_output_grad(m, args, output):
            seen["tokens"] = args[0]
            output.register_hook(lambda grad: seen.update(embedding_grad=grad))
        hooks.append(module.embedding.word_embeddings.register_forward_hook(keep_output_grad))
    run()
    for hook in hooks:
        hook.remove()
    x = seen["head_input"]  # [s, b, h]: token (i, j) is position i of sequence j
    weight = module.shared_embedding_or_output_weight() if tied else module.output_layer.weight
    dw = reference(x.reshape(-1, x.shape[-1]), weight, labels.t().reshape(-1), upstream.t().reshape(-1))[2]
    if tied:  # the embedding's output [b, s, h] is its weight's rows at the tokens
        grad = seen["embedding_grad"].double()
        dw.index_add_(0, seen["tokens"].reshape(-1), grad.reshape(-1, grad.shape[-1]))
    return dw


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_gpt_into_main_grad_matches_the_own_sum(tied, monkeypatch):
    """A bf16 GPT under DDP (fp32 main_grad), loss-masked mean: into main_grad vs the head's own sum,
    three steps (the head's expected upstream value 0, 0, then the mean's, right but for the masked
    tokens): the loss and every main_grad but the head weight's bit-equal; the head weight's (tied:
    with the embedding's gradient in the same buffer) within two bf16 roundings (max error relative
    to the largest entry, 2^-7) of the own sum's, and no farther from its fp64 value than the own
    sum's is plus half a rounding. Both are bf16 computations (logits, softmax gradient and each chunk's
    product rounded to bf16) whose error to fp64 is about 2^-8; the own sum also rounds the total
    (tied: adds it to the embedding's gradient in bf16)."""
    from tests.helpers.models import mst_head_gpt, tiny_config

    vocab, s, b = 256, 29, 3
    config = tiny_config(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, vocab, (b, s), generator=g) for _ in range(2))
    mask = (torch.rand(b, s, generator=g) > 0.3).float()
    positions = torch.arange(s).expand(b, s)
    models = []
    for way in ("own sum", "into main_grad"):
        torch.manual_seed(0)
        models.append(ddp(config, mst_head_gpt(config, 7, vocab_size=vocab, seq_length=s, tied=tied)))
    head_name = "embedding.word_embeddings.weight" if tied else "output_layer.weight"
    head = models[1].module.shared_embedding_or_output_weight() if tied else models[1].module.output_layer.weight
    for step in range(3):
        results = []
        for way, model in zip(("own sum", "into main_grad"), models):
            def run():
                model.zero_grad_buffer()
                loss = model(tokens, positions, None, labels=labels)
                ((loss * mask).sum() / mask.sum()).backward()
                return loss

            with monkeypatch.context() as patch:
                if way == "own sum":
                    own_sum(patch)
                ref = head_weight_grad_reference(model, lambda: results.append(run().detach()), labels,
                                                 mask.double() / mask.sum(), tied)
            results.append({n: p.main_grad.clone() for n, p in model.module.named_parameters()})
        own_loss, own_grads, loss, grads = results
        case = f"tied={tied} step {step}"
        assert head.grad_added_to_main_grad and head.grad is None, case
        assert torch.equal(loss, own_loss), case
        assert grads.keys() == own_grads.keys() and head_name in grads
        for name, own in own_grads.items():
            if name != head_name:
                assert torch.equal(grads[name], own), f"{case}: {name}"
        into, own = grads[head_name], own_grads[head_name]
        errors = rel_err(into, ref), rel_err(own, ref)
        print(f"\n{case}: {head_name} max rel. error to fp64: into main_grad {errors[0]:.3g}, own sum "
              f"{errors[1]:.3g}; into main_grad vs own sum {rel_err(into, own):.3g}")
        assert errors[0] <= errors[1] + 2.0**-9 and rel_err(into, own) <= 2 * BF16_ROUNDING, case
    assert models[1].module.output_layer.main_grad_sum(head).expected_grad == (1 / mask.sum()).item()
