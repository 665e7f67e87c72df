"""Each bridge of the CPU compatibility layer, in spawned gloo ranks (a fresh process each, so the
bridges' install and restore start from an untouched megatron-core).

The schedules, p2p communication and the tied-embedding bridge are exercised for real by the
pipeline-parallel runs in test_baseline.py; dist_checkpointing by its TP=1 -> TP=2 reload; the
bf16 and distributed optimizers by the DP=2 run in test_pretrain.py.
"""

import pytest
import torch

import mst_megatron
from tests.helpers.multirank import run_on_ranks


def _bridges_on_two_ranks():
    import torch.nn.functional as F
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.utils import get_default_causal_mask

    from mst_megatron.runtime import cpu_compat

    bridges = mst_megatron.init_parallel(tensor_model_parallel_size=2, seed=7)
    assert bridges is cpu_compat.active() is not None
    assert torch.distributed.get_backend() == "gloo"
    tracker = tensor_parallel.get_cuda_rng_tracker()
    rank = parallel_state.get_tensor_model_parallel_rank()

    # RNG tracker: the model-parallel stream differs across TP ranks, the default stream does not,
    # and fork() leaves the default stream where it was.
    before = torch.get_rng_state()
    with tracker.fork():
        mp_draw = torch.rand(4)
    assert torch.equal(before, torch.get_rng_state())
    default_draw = torch.rand(4)
    draws = [torch.empty(4) for _ in range(2)]
    torch.distributed.all_gather(draws, mp_draw)
    assert not torch.equal(draws[0], draws[1]), "TP ranks must draw different model-parallel streams"
    torch.distributed.all_gather(draws, default_draw)
    assert torch.equal(draws[0], draws[1]), "the default stream is the same on TP ranks"

    # tensor_parallel.checkpoint (full recompute) replays the same dropout masks in backward.
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)

    def block(inp):
        with tracker.fork():
            return F.dropout(inp @ w, p=0.5, training=True)

    states = tensor_parallel.random._get_all_rng_states()
    (block(x) ** 2).sum().backward()
    expected = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    tensor_parallel.random._set_all_rng_states(*states)
    (tensor_parallel.checkpoint(block, False, x) ** 2).sum().backward()
    assert torch.equal(x.grad, expected[0]) and torch.equal(w.grad, expected[1])

    # RoPE frequencies, the causal mask and the SP all-gather buffer all land on the CPU.
    assert RotaryEmbedding(kv_channels=16, rotary_percent=1.0)(8).device.type == "cpu"
    mask = get_default_causal_mask(5)
    assert mask.device.type == "cpu" and torch.equal(mask, torch.ones(5, 5).triu(1).bool())
    buf = parallel_state.get_global_memory_buffer().get_tensor((3, 2), torch.float32, "test")
    assert buf.device.type == "cpu"
    local = torch.full((2, 1, 3), float(rank))
    gathered = tensor_parallel.gather_from_sequence_parallel_region(local)
    assert torch.equal(gathered[:, 0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))

    # Gradient clipping scales in place like megatron's, without its CUDA-tensor assertion.
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    for p in params:
        p.grad = torch.full((3,), 2.0)
    cpu_compat._clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=4.0)
    assert torch.allclose(params[0].grad, torch.full((3,), 0.5), rtol=1e-5)

    # The optimizers' parameter sort sees CUDA type names, only while they are built.
    with cpu_compat._tensor_type_names_cuda():
        assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.zeros(1).type(torch.float64).dtype == torch.float64
    assert torch.zeros(1).type() == "torch.FloatTensor"
    mst_megatron.destroy_parallel()
    assert not torch.distributed.is_initialized()


def test_cpu_bridges_on_two_ranks():
    run_on_ranks(_bridges_on_two_ranks, 2)


def _nothing_bridged_when_cuda_present():
    import megatron.core.utils as mcore_utils
    from megatron.core.tensor_parallel import random as tp_random

    from mst_megatron.runtime import cpu_compat

    torch.cuda.is_available = lambda: True
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu_compat.install()
    assert cpu_compat.active() is None
    assert mcore_utils.torch is torch
    assert tp_random._get_cuda_rng_state is not cpu_compat._get_device_rng_state


def test_bridges_stay_off_when_cuda_is_present():
    run_on_ranks(_nothing_bridged_when_cuda_present, 1)


def _bridges_install_and_restore():
    import megatron.core.utils as mcore_utils
    from megatron.core.optimizer import optimizer
    from megatron.core.tensor_parallel import random as tp_random

    from mst_megatron.runtime import cpu_compat

    originals = (mcore_utils.torch, tp_random._get_cuda_rng_state, optimizer.clip_grad_by_total_norm_fp32,
                 optimizer.Float16OptimizerWithFloat16Params.__init__)
    bridges = cpu_compat.install()
    assert cpu_compat.install() is bridges  # idempotent
    touched = bridges.touched()
    assert "megatron.core.utils.torch" in touched
    assert "megatron.core.tensor_parallel.random._get_cuda_rng_state" in touched
    assert "megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__" in touched
    assert len(touched) == len(set(touched)) == len(cpu_compat.BRIDGED_MODULES) + 9
    assert mcore_utils.torch is not torch
    bridges.restore()
    assert cpu_compat.active() is None
    assert (mcore_utils.torch, tp_random._get_cuda_rng_state, optimizer.clip_grad_by_total_norm_fp32,
            optimizer.Float16OptimizerWithFloat16Params.__init__) == originals


def test_bridges_record_what_they_replace_and_restore_it():
    run_on_ranks(_bridges_install_and_restore, 1)


def _single_process_world():
    import os

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        os.environ.pop(var)
    mst_megatron.init_parallel()
    assert torch.distributed.get_world_size() == 1
    mst_megatron.destroy_parallel()


def test_init_parallel_without_torchrun_is_a_one_rank_world():
    run_on_ranks(_single_process_world, 1)
