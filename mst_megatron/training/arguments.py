"""Command-line flags of the pretraining script, named as in Megatron-LM, and the checks on them.

Everything here runs before torch.distributed starts, identically on every rank, so a bad flag
stops all ranks with the same one-line :class:`~mst_megatron.training.SetupError` instead of a
hang or a traceback from deep inside megatron-core.
"""

import argparse
import dataclasses
import math
import os
from typing import Optional

from mst_megatron.layout import ParallelLayout
from mst_megatron.training import SetupError
from mst_megatron.training.tokenizer import add_tokenizer_arguments

_SHAPE_OVERRIDES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "max_position_embeddings")
STOCK_ATTENTIONS = ("local", "sdpa")  # --stock-attention: the --no-mst model's attention


def add_mst_flags(parser: argparse.ArgumentParser):
    """The MST chunk-count flags, in their own argument group (returned)."""
    g = parser.add_argument_group("mini-sequence transformers")
    g.add_argument("--mlp-mini-sequences", type=int_or_auto_arg, default="auto",
                   help="MLP chunks per sequence: an int or 'auto'")
    g.add_argument("--lm-head-mini-sequences", type=int_or_auto_arg, default="auto",
                   help="LM-head + cross-entropy chunks per sequence: an int or 'auto'")
    g.add_argument("--offload-layer-inputs", action="store_true",
                   help="with --recompute-granularity full: keep the layer inputs in host memory until backward")
    return g


def int_or_auto_arg(text: str):
    """argparse type of the MST chunk-count flags (and the simulator's --seq-length): an int >= 1 or "auto"."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1 or 'auto', got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``prog: error: message``, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pretrain_gpt_mst.py",
        description="Pretrain a GPT with Mini-Sequence Transformers on megatron-core (launch with torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model-config", default="tiny",
                   help="JSON model shape: a path, or a name from examples/configs (tiny, llama3-8b, ...)")
    for name in _SHAPE_OVERRIDES:
        g.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="override the model config")
    g.add_argument("--rotary-base", type=int, default=None, help="override the model config's RoPE base")
    g.add_argument("--use-rope-scaling", action="store_true", default=None,
                   help="Llama-3.1 RoPE frequency scaling (megatron-core's; original context 8192)")
    g.add_argument("--rope-scaling-factor", type=float, default=None,
                   help="the RoPE scaling factor (with --use-rope-scaling; model config's, else 8)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)

    g = add_mst_flags(p)
    g.add_argument("--no-mst", action="store_true", help="stock megatron-core GPTModel and layer spec")
    g.add_argument("--stock-attention", choices=STOCK_ATTENTIONS, default="local",
                   help="with --no-mst: megatron-core's local attention (materialises the [b, heads, s, s] "
                        "scores; default), or MST's SDPA attention (a flash kernel, context parallel) with "
                        "megatron-core's own MLP and LM head: stock megatron with a fused attention, the "
                        "baseline of MST's own effect")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--cp-comm-type", choices=("a2a", "p2p", "a2a+p2p"), default="a2a",
                   help="context-parallel exchange: all-to-all (heads per TP rank divisible by CP), ring, "
                        "or all-to-all inside groups and ring across them")
    g.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs="+", default=None,
                   help="for --cp-comm-type a2a+p2p: the all-to-all size and the ring size (product CP)")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")

    g = p.add_argument_group("batch and recompute")
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)

    g = p.add_argument_group("optimization")
    g.add_argument("--train-iters", type=int, default=300)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-4)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine", "inverse-square-root"),
                   default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None, metavar="[WEIGHT] PREFIX",
                   help="dataset prefixes (PREFIX.bin/.idx), optionally weighted: 'p1 p2' or 'w1 p1 w2 p2'")
    g.add_argument("--split", default="98,2,0", help="train,valid,test shares of each dataset")
    add_tokenizer_arguments(g)
    g.add_argument("--data-cache-path", default=None, help="sample-index cache (default: next to the data)")

    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-interval", type=int, default=50)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--save", default=None, help="checkpoint root folder")
    g.add_argument("--load", default=None,
                   help="checkpoint root (or one of its iter_NNNNNNN folders) to resume from; a root without "
                        "a checkpoint starts from scratch only when it is also --save")
    g.add_argument("--ckpt-step", type=int, default=None, help="load this iteration instead of the latest")
    g.add_argument("--finetune", action="store_true",
                   help="load the weights only: fresh optimizer, scheduler and RNG, iteration and samples from 0")
    g.add_argument("--no-load-optim", action="store_true",
                   help="do not load the optimizer and scheduler state (the iteration is still resumed)")
    g.add_argument("--no-load-rng", action="store_true", help="do not load the RNG states")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="resume with this run's LR/WD schedule flags where they differ from the checkpoint's")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="resume with the checkpoint's LR/WD schedule, ignoring this run's schedule flags")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (evaluate, save) after this much wall-clock time, setup included")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard logs (needs tensorboard installed)")
    return p


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SetupError(message)


def check_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Validate flags against each other and the world size (default: torchrun's); fill derived fields.

    Sets ``args.layout`` (:class:`~mst_megatron.layout.ParallelLayout`; its errors are
    :class:`~mst_megatron.layout.LayoutError`), ``args.data_parallel_size``, ``args.num_microbatches``,
    ``args.virtual_pipeline_model_parallel_size`` (see :func:`check_shape`) and ``args.lr_decay_iters``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    positive = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                "seq_length", "micro_batch_size", "global_batch_size", "train_iters", "eval_iters",
                "log_interval", "make_vocab_size_divisible_by")
    for name in positive:
        _require(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_interval", "save_interval", "num_layers_per_virtual_pipeline_stage", "recompute_num_layers"):
        value = getattr(args, name)
        _require(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    _require(args.data_path is not None, "--data-path is required (see scripts/preprocess_data.py)")
    _require(args.tokenizer_model is not None,
             f"--tokenizer-model is required (--tokenizer-type {args.tokenizer_type}; see scripts/train_tokenizer.py)")

    cp = args.context_parallel_size
    _require(args.no_mst or args.stock_attention == "local",
             f"--stock-attention {args.stock_attention} chooses the stock model's attention: it needs --no-mst "
             "(the MST model always runs MST's SDPA attention)")
    _require(cp == 1 or not args.no_mst or args.stock_attention == "sdpa",
             f"--context-parallel-size {cp} needs MST's attention: megatron-core's local spec "
             "(--no-mst) has no context parallelism without Transformer Engine; drop --no-mst or add "
             "--stock-attention sdpa")
    _require(not args.offload_layer_inputs or (not args.no_mst and args.recompute_granularity == "full"),
             "--offload-layer-inputs keeps the inputs that full recompute stores in host memory: it needs "
             f"--recompute-granularity full (got {args.recompute_granularity}) and the MST model (no --no-mst)")
    args.layout = layout_of(args, world_size)
    args.layout.check_seq_length(args.seq_length)
    args.data_parallel_size = args.layout.dp
    per_step = args.micro_batch_size * args.data_parallel_size
    _require(
        args.global_batch_size % per_step == 0,
        f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
        f"({args.micro_batch_size}) x data-parallel size ({args.data_parallel_size}) = {per_step}",
    )
    args.num_microbatches = args.global_batch_size // per_step
    args.virtual_pipeline_model_parallel_size = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        _require(args.layout.pp > 1,
                 "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")

    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    _require(args.lr_warmup_iters < args.lr_decay_iters,
             f"--lr-warmup-iters ({args.lr_warmup_iters}) must be < --lr-decay-iters ({args.lr_decay_iters})")
    _require(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    _require(0.0 <= args.min_lr <= args.lr, f"--min-lr ({args.min_lr}) must be in [0, --lr ({args.lr})]")
    _require(args.lr_warmup_iters >= 0, f"--lr-warmup-iters must be >= 0, got {args.lr_warmup_iters}")
    ranges = {"weight_decay": (0.0, math.inf, "[0, inf)"), "clip_grad": (0.0, math.inf, "[0, inf)"),
              "hidden_dropout": (0.0, 1.0, "[0, 1]"), "attention_dropout": (0.0, 1.0, "[0, 1]")}
    for name, (low, high, text) in ranges.items():
        value = getattr(args, name)
        _require(low <= value <= high, f"--{name.replace('_', '-')} must be in {text}, got {value}")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(args, name)
        _require(0.0 <= value < 1.0, f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    for name in ("adam_eps", "init_method_std"):
        _require(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    _require(not (args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler),
             "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other")
    for name in ("finetune", "no_load_optim", "no_load_rng", "override_opt_param_scheduler",
                 "use_checkpoint_opt_param_scheduler"):
        flag = "--" + name.replace("_", "-").replace("opt-param", "opt_param")
        _require(not getattr(args, name) or args.load is not None, f"{flag} needs --load")
    _require(args.ckpt_step is None or args.ckpt_step >= 0, f"--ckpt-step must be >= 0, got {args.ckpt_step}")
    _require(args.save_interval is None or args.save is not None, "--save-interval needs --save")
    _require(args.ckpt_step is None or args.load is not None, "--ckpt-step needs --load")
    for name in ("rotary_base", "rope_scaling_factor"):
        value = getattr(args, name)
        _require(value is None or value > 0, f"--{name.replace('_', '-')} must be > 0, got {value}")
    minutes = args.exit_duration_in_mins
    _require(minutes is None or minutes > 0, f"--exit-duration-in-mins must be > 0, got {minutes}")
    for flag, path in (("--save", args.save), ("--tensorboard-dir", args.tensorboard_dir),
                       ("--data-cache-path", args.data_cache_path)):
        if path is not None:
            check_writable_dir(flag, path)
    return args


def offloaded_bytes(args: argparse.Namespace, shape) -> int:
    """Host bytes one rank holds at most under ``--offload-layer-inputs``: the layer inputs of the
    forwards in flight at the first pipeline stage (1F1B: ``min(PP, micro-batches)`` micro-batches of
    ``L / PP`` layers; interleaved: megatron's warm-up count of model chunks of ``L / (PP x VPP)``
    layers), plus one final-norm input, each ``[S / CP (/ TP under SP), b, h]``."""
    pp, vpp = args.layout.pp, args.virtual_pipeline_model_parallel_size or 1
    if vpp == 1:
        layers = shape.num_layers // pp * min(pp, args.num_microbatches)
    else:
        layers = shape.num_layers // (pp * vpp) * min(args.num_microbatches * vpp, (pp - 1) * 2 + (vpp - 1) * pp + 1)
    tokens = args.seq_length // args.layout.cp // (args.layout.tp if args.sequence_parallel else 1)
    return (layers + 1) * tokens * args.micro_batch_size * shape.hidden_size * (2 if args.bf16 else 4)


def check_host_memory(args: argparse.Namespace, shape) -> None:
    """The host memory ``--offload-layer-inputs`` needs on this node (every local rank's
    :func:`offloaded_bytes`; ``LOCAL_WORLD_SIZE`` ranks) fits what the machine has available."""
    from mst_megatron.measure.memory import mem_available_bytes

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        available = mem_available_bytes()
    except RuntimeError as e:
        raise SetupError(f"--offload-layer-inputs: cannot check host memory: {e}") from None
    needed = offloaded_bytes(args, shape) * local_ranks
    _require(needed <= available,
             f"--offload-layer-inputs needs {needed / 2**30:.2f} GiB of host memory on this node ({local_ranks} "
             f"ranks x {needed / local_ranks / 2**30:.2f} GiB of layer inputs) but {available / 2**30:.2f} GiB are "
             "available; drop the flag, shorten --seq-length or use more GPUs (TP with SP, CP or PP)")


def layout_of(args: argparse.Namespace, world_size: int) -> ParallelLayout:
    """The parallel layout the flags ask for on ``world_size`` ranks (virtual stages: :func:`check_shape`)."""
    sizes = args.hierarchical_context_parallel_sizes
    return ParallelLayout.for_world(
        world_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size,
        sp=args.sequence_parallel, cp_comm_type=args.cp_comm_type,
        hierarchical_cp_sizes=None if sizes is None else tuple(sizes),
    )


def check_writable_dir(flag: str, path: str) -> None:
    """``path`` is a folder this process may write into, or one it may create."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    _require(os.path.isdir(existing), f"{flag} {path}: {existing} is not a folder")
    _require(os.access(existing, os.W_OK | os.X_OK),
             f"{flag} {path}: {existing} is not writable; pick a folder this job may write into")


def check_shape(args: argparse.Namespace, shape) -> None:
    """Checks that need the model shape: sequence length and the pipeline split of the layers."""
    _require(
        args.seq_length <= shape.max_position_embeddings,
        f"--seq-length {args.seq_length} exceeds the model's max_position_embeddings "
        f"({shape.max_position_embeddings}); raise --max-position-embeddings or lower --seq-length",
    )
    _require(args.rope_scaling_factor is None or shape.rope_scaling,
             "--rope-scaling-factor needs RoPE scaling on: --use-rope-scaling, or rope_scaling true in the model config")
    layout = args.layout
    layout.check_heads(shape.num_attention_heads, shape.num_query_groups)
    _require(shape.ffn_hidden_size % layout.tp == 0,
             f"the model's ffn_hidden_size ({shape.ffn_hidden_size}) is not divisible by "
             f"--tensor-model-parallel-size {layout.tp}")
    layout.check_layers(shape.num_layers)
    per_virtual = args.num_layers_per_virtual_pipeline_stage
    if per_virtual is not None:
        per_stage = shape.num_layers // layout.pp
        _require(per_stage % per_virtual == 0,
                 f"--num-layers-per-virtual-pipeline-stage {per_virtual} does not divide the "
                 f"{per_stage} layers of each pipeline stage")
        chunks = per_stage // per_virtual
        args.virtual_pipeline_model_parallel_size = chunks if chunks > 1 else None
        args.layout = dataclasses.replace(layout, vpp=args.virtual_pipeline_model_parallel_size)


def shape_overrides(args: argparse.Namespace) -> dict:
    """The model-shape flags given on the command line."""
    out = {name: getattr(args, name) for name in _SHAPE_OVERRIDES if getattr(args, name) is not None}
    rope = dict(rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling,
                rope_scaling_factor=args.rope_scaling_factor)
    return {**out, **{k: v for k, v in rope.items() if v is not None}}
