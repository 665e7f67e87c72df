"""A few megatron-core training steps on a fixed batch, shared by the multi-rank tests."""

import torch

from tests.helpers import rel_err


def fixed_batches(num_microbatches, micro_batch_size, seq_length, vocab_size, seed=0):
    """Deterministic token/label micro-batches, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (num_microbatches, micro_batch_size, seq_length), generator=g)
    return tokens, torch.roll(tokens, -1, dims=-1)


def loss_over_tokens(per_token_loss, loss_mask=None):
    """Megatron's contract: the model returns per-token losses [b, s]; the caller reduces.

    Under context parallelism each rank sees its shard of the tokens, and megatron's schedule
    multiplies a two-value loss by the CP size (DDP then averages over DP x CP): so, as in
    Megatron-LM's GPT loss, this rank's sum is divided by the CP group's token count, and the
    reported loss is the CP group's mean.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    per_token_loss = per_token_loss.float()
    mask = torch.ones_like(per_token_loss) if loss_mask is None else loss_mask.float()
    local_sum = (per_token_loss * mask).sum()
    totals = torch.stack([local_sum.detach(), mask.sum()])
    if ps.get_context_parallel_world_size() > 1:
        dist.all_reduce(totals, group=ps.get_context_parallel_group())
    return local_sum / totals[1], {"lm loss": totals[0] / totals[1]}


def forward_backward(model_chunks, tokens, labels, forward_only=False):
    """One global batch through megatron's schedule; returns the mean loss (last stage) or None.

    Under context parallelism each rank takes its shard of every micro-batch in megatron's
    load-balanced layout (``get_batch_on_this_cp_rank``).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from mst_megatron.runtime.mcore_adapter import batch_on_this_cp_rank

    num_microbatches, micro_batch_size, seq_length = tokens.shape
    positions = torch.arange(seq_length).unsqueeze(0).expand(micro_batch_size, seq_length)

    def forward_step(data_iterator, model):
        i = next(data_iterator)
        batch = batch_on_this_cp_rank(dict(tokens=tokens[i], labels=labels[i], positions=positions))
        return model(batch["tokens"], batch["positions"], None, labels=batch["labels"]), loss_over_tokens

    iterators = [iter(range(num_microbatches)) for _ in model_chunks]
    many = len(model_chunks) > 1
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if many else iterators[0],
        model=model_chunks if many else model_chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    if not losses:
        return None
    return float(sum(x["lm loss"] for x in losses) / len(losses))


def unwrap(model):
    """The model inside megatron's wrappers."""
    while hasattr(model, "module"):  # DDP, Float16Module
        model = model.module
    return model


def grads_by_name(chunks):
    """``{"<chunk>.<param name>": gradient}``, DDP's ``main_grad`` where there is one."""
    out = {}
    for i, chunk in enumerate(chunks):
        for name, p in unwrap(chunk).named_parameters():
            out[f"{i}.{name}"] = getattr(p, "main_grad", p.grad)
    return out


def grad_error(got, ref):
    """max over parameters of max|g - r| / max|r|."""
    assert got.keys() == ref.keys()
    worst = 0.0
    for name, r in ref.items():
        g = got[name]
        assert r is not None and g is not None, f"{name}: missing gradient"
        worst = max(worst, rel_err(g, r))
    return worst


def assert_bf16_grads_as_close_as_stock(truth, stock16, mst16):
    """Every bf16 MST gradient no further from the fp32 model's (``truth``) than twice the stock bf16
    gradient's error plus one bf16 unit roundoff (2^-8) of the gradient's max."""
    import torch

    g32, g_stock, g_mst = grads_by_name([truth]), grads_by_name([stock16]), grads_by_name([mst16])
    for name, ref in g32.items():
        assert g_mst[name].dtype == torch.bfloat16
        stock_err = grad_error({name: g_stock[name]}, {name: ref})
        assert grad_error({name: g_mst[name]}, {name: ref}) <= 2 * stock_err + 2**-8, name


def wrap_ddp(chunks, config):
    """megatron's DDP + finalize_model_grads: what all-reduces SP norm gradients over TP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    return [DistributedDataParallel(config, DistributedDataParallelConfig(), c) for c in chunks]
