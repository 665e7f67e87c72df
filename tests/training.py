"""A few megatron-core training steps on a fixed batch, shared by the multi-rank tests."""

import torch


def fixed_batches(num_microbatches, micro_batch_size, seq_length, vocab_size, seed=0):
    """Deterministic token/label micro-batches, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (num_microbatches, micro_batch_size, seq_length), generator=g)
    return tokens, torch.roll(tokens, -1, dims=-1)


def loss_over_tokens(per_token_loss, loss_mask=None):
    """Megatron's contract: the model returns per-token losses [b, s]; the caller reduces."""
    per_token_loss = per_token_loss.float()
    if loss_mask is None:
        loss = per_token_loss.mean()
    else:
        loss = (per_token_loss * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach().clone()}


def forward_backward(model_chunks, tokens, labels, forward_only=False):
    """One global batch through megatron's schedule; returns the mean loss (last stage) or None."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    num_microbatches, micro_batch_size, seq_length = tokens.shape
    positions = torch.arange(seq_length).unsqueeze(0).expand(micro_batch_size, seq_length)

    def forward_step(data_iterator, model):
        i = next(data_iterator)
        return model(tokens[i], positions, None, labels=labels[i]), loss_over_tokens

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
