"""MSTGPTModel(offload_layer_inputs=True) on one rank: under full recompute the decoder's layer inputs
wait in host memory, and loss and every gradient are bit-identical to the run without offload."""

import pytest
import torch

from tests.helpers.models import tiny_config
from tests.helpers.training import fixed_batches, forward_backward

pytestmark = pytest.mark.usefixtures("one_rank")

FULL = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
S, B, VOCAB = 48, 2, 256


def _model(config, offload):
    from mst_megatron import MSTGPTModel, get_gpt_mst_block_spec

    torch.manual_seed(0)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(0)
    return MSTGPTModel(config, get_gpt_mst_block_spec(config, 3), VOCAB, S, position_embedding_type="rope",
                       lm_head_mini_sequences=5, offload_layer_inputs=offload)


def _step(model, tokens, labels):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(1)  # the same dropout masks in both runs
    loss = forward_backward([model], tokens, labels)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return loss, grads


@pytest.mark.parametrize("method", ["uniform", "block"])
def test_offloaded_step_is_bit_identical(method):
    config = tiny_config(**dict(FULL, recompute_method=method, recompute_num_layers=1 if method == "uniform" else 3),
                         hidden_dropout=0.1, num_layers=3)
    plain, offloaded = _model(config, False), _model(config, True)
    offloaded.load_state_dict(plain.state_dict())
    tokens, labels = fixed_batches(2, B, S, VOCAB)
    want_loss, want = _step(plain, tokens, labels)
    offload = offloaded.layer_input_offload
    offload.min_bytes = 1  # the tiny model's layer inputs are 24 KiB
    for _ in range(2):
        loss, got = _step(offloaded, tokens, labels)
        assert loss == want_loss
        assert all(torch.equal(got[n], want[n]) for n in want), [n for n in want if not torch.equal(got[n], want[n])]
        assert offload.host_bytes == 0
    # what the checkpoints save: each layer's input [S, B, h], one micro-batch at a time
    assert offload.peak_host_bytes == 3 * S * B * config.hidden_size * 4


def test_offload_needs_full_recompute():
    from mst_megatron import MSTGPTModel, get_gpt_mst_block_spec

    config = tiny_config(recompute_granularity="selective")
    with pytest.raises(ValueError, match="offload_layer_inputs=True .* needs recompute_granularity='full', "
                                         "got 'selective'"):
        MSTGPTModel(config, get_gpt_mst_block_spec(config), VOCAB, S, offload_layer_inputs=True)
    with pytest.raises(ValueError, match="offload_layer_inputs must be True or False, got 1"):
        MSTGPTModel(config, get_gpt_mst_block_spec(config), VOCAB, S, offload_layer_inputs=1)
    config = tiny_config(**dict(FULL, recompute_method="block", recompute_num_layers=1))
    with pytest.raises(ValueError, match=r"recompute_method='block' needs every layer of the chunk checkpointed "
                                         r"\(recompute_num_layers >= 2, got 1\)"):
        MSTGPTModel(config, get_gpt_mst_block_spec(config), VOCAB, S, offload_layer_inputs=True)
