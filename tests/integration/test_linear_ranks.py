"""The chunked column-parallel linear (the MST layer's QKV projection) against megatron's own, under
TP=2 + sequence parallelism on two gloo ranks: output, bias and gradients, and the gather buffer size.

fp32 tolerances: relative error <= 1e-5 for outputs, 1e-4 for gradients (chunk-sized GEMMs only
change float rounding).
"""

import torch

from tests.helpers import rel_err
from tests.helpers.multirank import run_on_ranks

H, N = 8, 12  # input size (the auto rule's tokens per gathered chunk), output size (6 per rank)
S_LOCAL, B = 13, 2  # 26 gathered tokens: ceil(26 / 8) = 4 chunks of 4, 3, 3, 3 local tokens
OUT_TOL, GRAD_TOL = 1e-5, 1e-4


def _body():
    import mst_megatron
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from mst_megatron.modules.linear import MiniSequenceColumnParallelLinear
    from tests.helpers.models import tiny_config

    mst_megatron.init_parallel(tensor_model_parallel_size=2)
    config = tiny_config(sequence_parallel=True)
    rank = ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(0)
    shard = torch.randn(2 * S_LOCAL, B, H, generator=g).chunk(2)[rank]
    grad_out = torch.randn(2 * S_LOCAL, B, N // 2, generator=g)  # this rank's output columns
    for skip_bias_add in (False, True):
        layers = [
            cls(H, N, config=config, init_method=config.init_method, bias=True, gather_output=False,
                skip_bias_add=skip_bias_add)
            for cls in (ColumnParallelLinear, MiniSequenceColumnParallelLinear)
        ]
        torch.nn.init.normal_(layers[0].bias, generator=g)
        layers[1].load_state_dict(layers[0].state_dict())
        assert layers[1].num_chunks(S_LOCAL) == 4
        results = []
        for layer in layers:
            x = shard.clone().requires_grad_()
            output, bias = layer(x)
            ((output if bias is None else output + bias) * grad_out).sum().backward()
            results.append((output.detach(), bias, x.grad, layer.weight.grad, layer.bias.grad))
        (ref, ref_bias, *ref_grads), (got, got_bias, *grads) = results
        case = f"skip_bias_add={skip_bias_add}"
        assert got.shape == ref.shape == (2 * S_LOCAL, B, N // 2), case
        assert rel_err(got, ref) <= OUT_TOL, case
        assert (got_bias is None) == (ref_bias is None) and (got_bias is None or torch.equal(got_bias, ref_bias))
        for what, actual, expected in zip(("input", "weight", "bias"), grads, ref_grads):
            assert rel_err(actual, expected) <= GRAD_TOL, (case, what)
    # The stock layer gathered the whole sequence into megatron's global buffer; reset it and run the
    # chunked layer alone: the buffer holds one gathered chunk (4 local tokens from each rank) at most.
    ps.get_global_memory_buffer().buffer.clear()
    layer = layers[1]
    x = shard.clone().requires_grad_()
    (layer(x)[0] * grad_out).sum().backward()
    buffer = ps.get_global_memory_buffer().buffer[("mpu", torch.float32)]
    assert buffer.numel() == 2 * 4 * B * H, buffer.numel()
    ps.destroy_model_parallel()


def test_tp2_sp_matches_stock_and_gathers_one_chunk():
    run_on_ranks(_body, 2)
