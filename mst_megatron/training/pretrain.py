"""GPT pretraining on megatron-core's own pieces (model, DDP, optimizer, LR schedule, pipeline
schedules), MST on by default. Every input check runs before torch.distributed starts; SIGTERM asks
for a checkpoint after a step all ranks agree on (docs/design.md#checkpoints-and-resume).
"""

import argparse
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import List, Optional

import torch
import torch.distributed as dist

from mst_megatron.runtime.parallel import destroy_parallel, init_parallel
from mst_megatron.runtime.quiet import import_megatron_quietly
from mst_megatron.layout import LayoutError
from mst_megatron.training import RunError, SetupError, arguments, checkpointing, data, model_config
from mst_megatron.training.monitor import Monitor, max_over_ranks, peak_memory_bytes
from mst_megatron.training.tokenizer import describe as describe_tokenizer
from mst_megatron.training.tokenizer import load_tokenizer


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_gpt(config, shape, vocab_size: int, mst: Optional[dict], pre_process: bool, post_process: bool,
              vp_stage: Optional[int] = None, stock_attention: str = "local"):
    """The model provider: one model chunk, stock megatron-core when ``mst`` is None, with megatron's
    local layer spec (``stock_attention="local"``) or MST's layer spec unchunked (``"sdpa"``: MST's
    SDPA attention, megatron-core's MLP computation and LM head).

    ``mst`` (:func:`mst_options`) holds ``MSTGPTModel``'s options (``offload_layer_inputs`` may be
    left out: off). Both models have the same
    parameters and state-dict keys, so checkpoints move freely between them.
    """
    common = dict(
        config=config,
        vocab_size=vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=shape.share_embeddings_and_output_weights,
        position_embedding_type=shape.position_embedding_type,
        rotary_base=shape.rotary_base,
        rope_scaling=shape.rope_scaling,
        rope_scaling_factor=shape.rope_scaling_factor,
        vp_stage=vp_stage,
    )
    from mst_megatron.specs.gpt_layer_specs import get_gpt_mst_block_spec

    if mst is None:
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        if stock_attention not in arguments.STOCK_ATTENTIONS:
            raise ValueError(f"stock_attention must be one of {arguments.STOCK_ATTENTIONS}, got {stock_attention!r}")
        spec = (get_gpt_layer_local_spec(normalization=config.normalization) if stock_attention == "local"
                else get_gpt_mst_block_spec(config, 1, vp_stage=vp_stage))
        return GPTModel(transformer_layer_spec=spec, **common)
    from mst_megatron.modules.gpt_model import MSTGPTModel

    block_spec = get_gpt_mst_block_spec(config, mst["mlp_mini_sequences"], vp_stage=vp_stage)
    return MSTGPTModel(transformer_layer_spec=block_spec, lm_head_mini_sequences=mst["lm_head_mini_sequences"],
                       offload_layer_inputs=mst.get("offload_layer_inputs", False), **common)


def mst_options(args) -> Optional[dict]:
    """The MST options of the flags (None: ``--no-mst``, stock megatron-core)."""
    if args.no_mst:
        return None
    return dict(mlp_mini_sequences=args.mlp_mini_sequences, lm_head_mini_sequences=args.lm_head_mini_sequences,
                offload_layer_inputs=args.offload_layer_inputs)


def build_model(config, shape, vocab_size: int, mst: Optional[dict], use_distributed_optimizer: bool,
                check_for_nan_in_grad: bool = True, stock_attention: str = "local") -> List:
    """This rank's model chunks (several under virtual pipelining), in megatron-core DDP.

    ``check_for_nan_in_grad`` reads each gradient bucket's norm on the host (off in the simulator,
    whose fake tensors have no values)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    vpp = config.virtual_pipeline_model_parallel_size
    stages = list(range(vpp)) if vpp else [None]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=config.bf16,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=check_for_nan_in_grad,
    )
    chunks = []
    for i, stage in enumerate(stages):
        chunk = build_gpt(
            config, shape, vocab_size, mst,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage, stock_attention=stock_attention,
        ).to(_device())
        if config.bf16:
            chunk = Float16Module(config, chunk)
        # Buckets only for the first chunk, as in Megatron-LM: later chunks reduce in one go.
        chunks.append(DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0))
    return chunks


def build_optimizer(args, model: List):
    """megatron-core Adam (distributed or not) and Megatron-LM's sample-based LR schedule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model)
    return optimizer, build_scheduler(args, optimizer)


def build_scheduler(args, optimizer):
    """Megatron-LM's sample-based LR/WD schedule from the flags, with its resume rule (see
    :func:`~mst_megatron.training.checkpointing.check_resume`)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    samples = args.global_batch_size  # the scheduler counts samples, one step = one global batch
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * samples,
        lr_decay_steps=args.lr_decay_iters * samples,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * samples,
        wd_incr_style="constant",
        # Megatron-LM's resume rule; check_resume has refused differing flags unless one of these is given.
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler,
    )


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token losses over unmasked tokens, and their count (megatron then divides)."""
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(output_tensor.float().reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    # megatron divides `loss` in place: report a copy of the sum, with the count beside it.
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach().clone(), mask.sum()])}


def forward_step(data_iterator, model):
    """megatron's ``forward_step_func``: one micro-batch through one model chunk.

    Under context parallelism this rank keeps its shard of the sequence in megatron's load-balanced
    layout (chunks ``r`` and ``2 * CP - 1 - r`` of ``2 * CP``); the loss sums over that shard and
    megatron's schedule and DDP average it over DP x CP.
    """
    from mst_megatron.runtime.mcore_adapter import batch_on_this_cp_rank

    batch = {k: v.to(_device(), non_blocking=True) for k, v in next(data_iterator).items()}
    batch = batch_on_this_cp_rank(batch)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _mean_loss(losses: list) -> float:
    """Token-weighted mean loss over the data-parallel ranks (meaningful on the last stage)."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64, device=_device())
    for entry in losses:
        total += entry["lm loss"].to(total)
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


class _StopRequests:
    """Reasons to stop early: SIGTERM (the handler only sets a flag) or ``--exit-duration-in-mins``.

    :meth:`agreed` is one all-reduce per step, so every rank stops after the same step.
    """

    _REASONS = (None, "--exit-duration-in-mins reached", "SIGTERM received")

    def __init__(self, deadline: Optional[float]):
        self.deadline = deadline
        self.sigterm = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.sigterm = True

    def agreed(self) -> Optional[str]:
        code = 2 if self.sigterm else int(self.deadline is not None and time.time() > self.deadline)
        flag = torch.tensor([code], device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return self._REASONS[int(flag.item())]

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


_FORK_HOOK_SET = False


def _forks_die_with_this_process() -> None:
    """Processes this rank forks (megatron-core 0.16's checkpoint writers) get SIGTERM's default
    action back (not the rank's flag-only handler) and, on Linux, SIGKILL when the rank dies, so a
    SIGKILLed rank leaves none behind."""
    global _FORK_HOOK_SET
    if _FORK_HOOK_SET:
        return
    _FORK_HOOK_SET = True

    def child():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    os.register_at_fork(after_in_child=child)


class Trainer:
    """The training loop's state: model chunks, optimizer, scheduler, data, counters."""

    def __init__(self, args, model, optimizer, scheduler, train_ds, valid_ds, monitor, run_info, stop, model_shape):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.args, self.model, self.optimizer, self.scheduler = args, model, optimizer, scheduler
        self.train_ds, self.valid_ds, self.monitor, self.run_info = train_ds, valid_ds, monitor, run_info
        self.forward_backward = get_forward_backward_func()
        self.dp_rank = ps.get_data_parallel_rank()
        self.iteration = 0
        self.last_saved = None
        self.stop = stop
        self.model_shape = model_shape

    def _iterators(self, dataset, consumed_samples: int) -> list:
        """One iterator per model chunk over the same batches (the interleaved schedule's contract)."""
        a = self.args
        return [data.micro_batches(dataset, consumed_samples, a.micro_batch_size, self.dp_rank, a.data_parallel_size)
                for _ in self.model]

    def _run(self, iterators: list, forward_only: bool) -> list:
        a = self.args
        return self.forward_backward(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=self.model,
            num_microbatches=a.num_microbatches,
            seq_length=a.seq_length,
            micro_batch_size=a.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self, iterators: list):
        """One global batch: forward/backward, gradient reduction, optimizer and LR step."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run(iterators, forward_only=False)
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=self.args.global_batch_size)
        return _mean_loss(losses), grad_norm

    @torch.no_grad()
    def evaluate(self) -> None:
        """Validation loss over the same ``--eval-iters`` global batches every time."""
        if self.valid_ds is None:
            return
        for chunk in self.model:
            chunk.eval()
        iterators = self._iterators(self.valid_ds, 0)
        losses = []
        for _ in range(self.args.eval_iters):
            losses += self._run(iterators, forward_only=True)
        for chunk in self.model:
            chunk.train()
        self.monitor.validation(self.iteration, _mean_loss(losses))

    def save(self) -> None:
        if self.args.save is None or self.last_saved == self.iteration:
            return
        path = checkpointing.save_checkpoint(
            self.args.save, self.iteration, self.model, self.optimizer, self.scheduler,
            self.iteration * self.args.global_batch_size, self.run_info, self.model_shape,
        )
        self.last_saved = self.iteration
        self.monitor.plot(self.args.save)
        self.monitor.print(f"saved checkpoint {path} (loss plot: {os.path.join(self.args.save, 'loss.png')})")

    def load(self, ckpt: Optional[checkpointing.Checkpoint]) -> None:
        """Resume from ``ckpt`` (checked by :func:`check_inputs`); None: ``--load`` is ``--save`` and empty."""
        a = self.args
        if ckpt is None:
            self.monitor.print(f"--load {a.load}: no checkpoint yet, starting from scratch")
            return
        weights_only = a.finetune or a.no_load_optim
        iteration, _ = checkpointing.load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler,
                                                     load_optim=not weights_only,
                                                     load_rng=not (a.finetune or a.no_load_rng))
        if a.finetune or ckpt.common.get("weights_only"):
            self.monitor.print(f"loaded the weights of {ckpt.path}"
                               f"{' (--finetune)' if a.finetune else ' (weights only)'}: training from iteration 0")
            return
        self.iteration = self.last_saved = iteration
        self.monitor.print(f"resumed from {ckpt.path}" + (" (weights only: --no-load-optim)" if weights_only else ""))

    def train(self) -> None:
        a = self.args
        start = self.iteration
        if start >= a.train_iters:
            self.monitor.print(f"the checkpoint is at iteration {start} >= --train-iters {a.train_iters}: nothing to do")
            return
        if start == 0:
            self.evaluate()
        iterators = self._iterators(self.train_ds, start * a.global_batch_size)
        window_loss, window_steps, window_s = 0.0, 0, 0.0  # since the last log line; steps only
        while self.iteration < a.train_iters:
            t0 = time.time()
            loss, grad_norm = self.train_step(iterators)
            window_s += time.time() - t0
            self.iteration += 1
            window_loss += loss
            window_steps += 1
            if self.iteration % a.log_interval == 0 or self.iteration == a.train_iters:
                step_s = window_s / window_steps
                lr = self.optimizer.param_groups[0]["lr"]
                self.monitor.step(self.iteration, window_loss / window_steps, lr, grad_norm,
                                  a.global_batch_size * a.seq_length / step_s, step_s,
                                  max_over_ranks(peak_memory_bytes()))
                window_loss, window_steps, window_s = 0.0, 0, 0.0
            self.monitor.progress(self.iteration, start)
            if a.eval_interval and self.iteration % a.eval_interval == 0:
                self.evaluate()
            if a.save_interval and self.iteration % a.save_interval == 0:
                self.save()
            reason = self.stop.agreed()
            if reason:
                self.monitor.print(f"{reason}: saving and stopping at iteration {self.iteration}")
                self.save()
                return
        if not (a.eval_interval and self.iteration % a.eval_interval == 0):
            self.evaluate()
        self.save()


def _vocab_size(shape, tokenizer, args) -> int:
    """The model's padded vocabulary: the model config's ``vocab_size``, else the tokenizer's, which
    must fit in it (its ids index the embedding)."""
    tokens = tokenizer.vocab_size
    if shape.vocab_size is not None and tokens > shape.vocab_size:
        raise SetupError(
            f"--tokenizer-model has {tokens} tokens ({describe_tokenizer(args)}), more than the model's vocab_size "
            f"{shape.vocab_size} (--model-config {args.model_config}): use the model's tokenizer, or a model config "
            f"with vocab_size >= {tokens} or null (the tokenizer's)"
        )
    vocab = shape.vocab_size or tokens
    return args.layout.padded_vocab_size(vocab, args.make_vocab_size_divisible_by)


def _transformer_config(args, shape):
    cuda = torch.cuda.is_available()
    return model_config.transformer_config(
        shape,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        cp_comm_type=args.cp_comm_type,
        hierarchical_context_parallel_sizes=args.hierarchical_context_parallel_sizes,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        use_cpu_initialization=not cuda,
        # gloo: batched isend/irecv can pair the wrong tensors under interleaving; use single ops.
        batch_p2p_comm=cuda,
    )


def _carry_hf_files(load: str, save: str) -> None:
    """A run saving elsewhere than the imported root it loaded takes the root's Hugging Face files
    along (``hf/``, ``model_config.json``), so that the export finds them in ``--save``."""
    from mst_megatron.training.hf import HF_FOLDER, MODEL_CONFIG

    if os.path.abspath(load) == os.path.abspath(save):
        return
    os.makedirs(save, exist_ok=True)
    if os.path.isdir(os.path.join(load, HF_FOLDER)) and not os.path.exists(os.path.join(save, HF_FOLDER)):
        shutil.copytree(os.path.join(load, HF_FOLDER), os.path.join(save, HF_FOLDER))
    if os.path.isfile(os.path.join(load, MODEL_CONFIG)) and not os.path.exists(os.path.join(save, MODEL_CONFIG)):
        shutil.copy(os.path.join(load, MODEL_CONFIG), os.path.join(save, MODEL_CONFIG))


@dataclass
class RunInputs:
    """Everything :func:`check_inputs` checked before any work starts."""

    args: argparse.Namespace
    shape: model_config.ModelShape
    tokenizer: object
    blend: tuple
    vocab_size: int
    config: object  # TransformerConfig
    mst: Optional[dict]
    run_info: dict  # what a checkpoint must match (see checkpointing.check_resume)
    checkpoint: Optional[checkpointing.Checkpoint]  # what --load resumes; None: nothing to load

    def describe(self, train_ds, valid_ds) -> str:
        a = self.args
        mst = ("stock megatron-core" if self.mst is None else
               f"MST: mlp_mini_sequences={self.mst['mlp_mini_sequences']}, "
               f"lm_head_mini_sequences={self.mst['lm_head_mini_sequences']}")
        return (
            f"model {a.model_config}: {self.shape.parameter_count(self.vocab_size) / 1e6:,.2f}M parameters, "
            f"vocab {self.vocab_size} (tokenizer {self.tokenizer.vocab_size}, {a.tokenizer_type}) | {mst} | "
            f"TP={a.tensor_model_parallel_size} PP={a.pipeline_model_parallel_size} CP={a.context_parallel_size} "
            f"DP={a.data_parallel_size} | "
            f"{a.global_batch_size} x {a.seq_length} tokens per step, {a.num_microbatches} micro-batches | "
            f"{'bf16' if a.bf16 else 'fp32'} on {'CUDA' if torch.cuda.is_available() else 'CPU'} | "
            f"train {len(train_ds)} samples, valid {0 if valid_ds is None else len(valid_ds)} samples"
        )


def check_inputs(argv: Optional[List[str]] = None, configs_dir: Optional[str] = None) -> RunInputs:
    """Parse and check every input (flags, model config, tokenizer, data) on this rank alone."""
    args = arguments.check_args(arguments.build_parser().parse_args(argv))
    shape = model_config.load_model_shape(args.model_config, configs_dir).replace(**arguments.shape_overrides(args))
    arguments.check_shape(args, shape)
    if args.no_mst and args.sequence_parallel:
        raise SetupError("--sequence-parallel needs MST's norms: megatron-core's local spec refuses it; drop --no-mst")
    import_megatron_quietly()
    data.check_dataset_helpers()
    tokenizer = load_tokenizer(args)
    blend = data.parse_data_path(args.data_path)
    data.check_data(blend[0], tokenizer.vocab_size, args.split, describe_tokenizer(args))
    data.check_cache(blend[0], args.data_cache_path)
    mst = mst_options(args)
    if args.offload_layer_inputs:
        arguments.check_host_memory(args, shape)
    vocab_size = _vocab_size(shape, tokenizer, args)
    args.vocab_tokens = shape.vocab_size or tokenizer.vocab_size  # before padding
    run_info = dict(architecture={**shape.architecture(), "vocab_size": vocab_size},
                    use_distributed_optimizer=args.use_distributed_optimizer, bf16=args.bf16)
    checkpoint = None
    if args.load:
        checkpoint = checkpointing.find_checkpoint(args.load, args.save, args.ckpt_step)
        if checkpoint is not None:
            checkpointing.check_resume(args, checkpoint, run_info)
    config = _transformer_config(args, shape)
    return RunInputs(args, shape, tokenizer, blend, vocab_size, config, mst, run_info, checkpoint)


def run(p: RunInputs, start_time: float) -> None:
    """Start the parallel state and train as planned; ``start_time`` anchors --exit-duration-in-mins."""
    a = p.args
    deadline = None if a.exit_duration_in_mins is None else start_time + 60 * a.exit_duration_in_mins
    stop = _StopRequests(deadline)  # from here on, SIGTERM means "save after the next step"
    _forks_die_with_this_process()
    init_parallel(a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.context_parallel_size,
                  a.virtual_pipeline_model_parallel_size, seed=a.seed,
                  hierarchical_context_parallel_sizes=a.hierarchical_context_parallel_sizes)
    try:
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.rerun_state_machine import initialize_rerun_state_machine

        initialize_rerun_state_machine()  # as Megatron-LM does; megatron warns when it is left implicit
        monitor = Monitor(a.train_iters, dist.get_rank() == dist.get_world_size() - 1, a.tensorboard_dir,
                          tokens_per_step=a.global_batch_size * a.seq_length)
        train_ds, valid_ds = data.build_datasets(
            p.tokenizer, p.blend, a.split, a.seq_length, a.seed, a.train_iters * a.global_batch_size,
            a.eval_iters * a.global_batch_size, a.data_cache_path,
        )
        model = build_model(p.config, p.shape, p.vocab_size, p.mst, a.use_distributed_optimizer,
                            stock_attention=a.stock_attention)
        optimizer, scheduler = build_optimizer(a, model)
        p.config.finalize_model_grads_func = finalize_model_grads
        p.config.grad_scale_func = optimizer.scale_loss
        monitor.print(p.describe(train_ds, valid_ds))
        model_shape = dict(p.shape.__dict__, vocab_size=p.vocab_size)
        trainer = Trainer(a, model, optimizer, scheduler, train_ds, valid_ds, monitor, p.run_info, stop, model_shape)
        if a.load:
            trainer.load(p.checkpoint)
            if a.save and dist.get_rank() == 0:
                _carry_hf_files(a.load, a.save)
        trainer.train()
        monitor.close()
    finally:
        stop.restore()
        destroy_parallel()


def pretrain(argv: Optional[List[str]] = None, configs_dir: Optional[str] = None) -> None:
    """Check every input, then train (under torchrun, or as a one-rank world)."""
    start_time = time.time()
    run(check_inputs(argv, configs_dir), start_time)


def main(argv: Optional[List[str]] = None, configs_dir: Optional[str] = None) -> int:
    """CLI entry: 0 on success; 2 with a one-line message (rank 0) on bad input; 1 with a one-line
    message (one rank) when work fails (see :class:`~mst_megatron.training.RunError`)."""
    # torch deprecations triggered inside megatron-core's checkpoint reader: nothing to act on here.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            module=r"(torch\.distributed\.checkpoint|megatron\.core\.dist_checkpointing)")
    # The checks read checkpoint metadata before torch.distributed starts, on purpose.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                            category=UserWarning)
    # Megatron-LM's setting for TP communication ordering on GPU (megatron warns without it).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    try:
        pretrain(argv, configs_dir)
    except (SetupError, LayoutError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"pretrain_gpt_mst.py: error: {e}", file=sys.stderr, flush=True)
        else:  # every rank found it; let rank 0 print before torchrun stops the job on this exit
            time.sleep(2)
        return 2
    except RunError as e:
        if e.report:
            print(f"pretrain_gpt_mst.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


