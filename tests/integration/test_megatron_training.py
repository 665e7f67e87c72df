"""Megatron-LM's own training code (``megatron.training``, shipped in megatron-core 0.19's wheel) as
a client of MST, driven as a Megatron-LM user's script would: its argument parser with
``--spec mst_megatron.specs.registry mst_layer_spec`` and the MST flags from
``registry.add_mst_arguments``, its initialisation, its GPT model config and builder (the MST LM head
through the builder's pre-wrap hook), then megatron's schedule on CPU ranks, against the stock
model the same builder makes without ``--spec``.

One GPU query is answered for the test: ``validate_args`` asks for the GPU's architecture when TP > 1
(to check ``CUDA_DEVICE_MAX_CONNECTIONS``); here it is told Hopper's (9) and the variable is set.

Where the CPU path stops: ``megatron.training.pretrain()`` calls ``initialize_megatron()`` without
``allow_no_cuda`` (it asserts "Megatron requires CUDA") and then builds ``device='cuda'`` tensors,
so the training loop itself needs a GPU. On a CPU, ``initialize_megatron(allow_no_cuda=True)``
skips model-parallel initialisation (it runs only when a GPU is counted) yet seeds the RNGs from
it, so ``mst_megatron.init_parallel`` (process group, parallel state, CPU bridges) runs first. And
without ``--lazy-mpu-init`` it runs ``make`` in megatron-core's ``datasets`` folder to compile the
dataset helpers, but the wheel ships them compiled and without the Makefile, so ``make`` fails and
the process exits (on a GPU too); with ``--lazy-mpu-init`` (Megatron-LM's flag for an external
launcher) it returns its distributed set-up as a function, which the script calls. The builder's
``build_distributed_models`` wraps in DDP with a ``torch.cuda.Stream()`` (megatron.training is not
bridged): the test builds unwrapped and wraps with megatron-core's DDP itself.
"""

import functools
import os
import sys

import pytest

from tests.helpers.multirank import run_on_ranks

pytest.importorskip("megatron.training.models.gpt", reason="megatron.training ships with megatron-core >= 0.19")

SEQ, VOCAB = 96, 250


def _argv(mst: bool):
    argv = ["pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
            "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
            "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ), "--micro-batch-size", "2",
            "--global-batch-size", "2", "--tensor-model-parallel-size", "2", "--normalization", "RMSNorm",
            "--swiglu", "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
            "--disable-bias-linear", "--vocab-size", str(VOCAB), "--tokenizer-type", "NullTokenizer",
            "--mock-data", "--distributed-backend", "gloo", "--use-cpu-initialization", "--transformer-impl",
            "local", "--train-iters", "1", "--lr", "1e-4", "--no-gradient-accumulation-fusion",
            "--attention-dropout", "0", "--hidden-dropout", "0", "--seed", "5", "--lazy-mpu-init",
            "--no-rope-fusion", "--no-bias-swiglu-fusion", "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--no-persist-layer-norm"]
    if mst:
        argv += ["--spec", "mst_megatron.specs.registry", "mst_layer_spec", "--lm-head-mini-sequences", "5"]
    return argv


def _build(mst: bool, initialize: bool):
    """What a Megatron-LM 0.19 script does: parse, initialise (once per process), config from args,
    builder."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training import arguments, global_vars
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.initialize import initialize_megatron
    from megatron.training.models.gpt import GPTModelBuilder

    import mst_megatron
    from mst_megatron.specs import registry
    from tests.helpers.training import wrap_ddp

    sys.argv = _argv(mst)
    os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    arguments.get_device_arch_version = lambda: 9  # the GPU query above
    args = arguments.parse_args(extra_args_provider=registry.add_mst_arguments)
    arguments.validate_args(args)
    if initialize:
        global_vars.set_global_variables(args, build_tokenizer=False)
        # On a CPU, initialize_megatron seeds megatron's RNGs from parallel state it does not set up.
        mst_megatron.init_parallel(args.tensor_model_parallel_size, seed=args.seed)
        finish_mpu_init = initialize_megatron(allow_no_cuda=True)  # --lazy-mpu-init: see the module doc
        finish_mpu_init()
    config = gpt_config_from_args(args)
    if mst:
        config.pre_wrap_hooks.append(
            functools.partial(registry.mst_pre_wrap_hook, lm_head_mini_sequences=args.lm_head_mini_sequences))
    # wrap_with_ddp=False: the builder's own DDP wrap makes a torch.cuda.Stream (module doc); the
    # same megatron-core DDP wraps the chunks here instead.
    chunks = GPTModelBuilder(config).build_distributed_models(
        ProcessGroupCollection.use_mpu_process_groups(), wrap_with_ddp=False, mixed_precision_wrapper=None)
    (model,) = wrap_ddp(chunks, config.transformer)
    return args, model


def _client_matches_stock():
    import torch

    from mst_megatron import MSTGPTModel
    from mst_megatron.modules.mlp import MiniSequenceMLP
    from tests.helpers.training import fixed_batches, forward_backward, grad_error, grads_by_name, unwrap

    args, mst = _build(mst=True, initialize=True)
    net = unwrap(mst)
    assert type(net) is MSTGPTModel and net.output_layer.mini_sequences == 5
    mlp = net.decoder.layers[0].mlp
    assert isinstance(mlp, MiniSequenceMLP) and mlp.num_chunks(SEQ) == 3  # auto: ceil(96 / 32)
    assert mlp.tp_group is net.decoder.layers[0].pg_collection.tp  # the group megatron handed it
    _, stock = _build(mst=False, initialize=False)
    assert type(unwrap(stock)).__name__ == "GPTModel"
    unwrap(stock).load_state_dict(net.state_dict())
    tokens, labels = fixed_batches(1, args.micro_batch_size, SEQ, VOCAB)
    losses = [forward_backward([m], tokens, labels) for m in (mst, stock)]
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[1]), losses
    assert grad_error(grads_by_name([mst]), grads_by_name([stock])) <= 1e-4
    torch.distributed.barrier()


def test_megatron_lm_client_builds_mst_and_matches_stock():
    run_on_ranks(_client_matches_stock, 2)
