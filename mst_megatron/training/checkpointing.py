"""Save and resume training with megatron-core ``dist_checkpointing``, in Megatron-LM's layout:
``<root>/iter_NNNNNNN/`` per checkpoint, ``<root>/latest_checkpointed_iteration.txt`` naming the
newest complete one. Checkpoints load under another TP/PP/DP layout and into a stock ``GPTModel``;
RNG states are restored only under the layout they were saved with. :func:`find_checkpoint` and
:func:`check_resume` run before torch.distributed starts. Resume rules: docs/design.md#checkpoints-and-resume.
"""

import contextlib
import math
import os
import queue
import random
import re
import shutil
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from mst_megatron.training import RunError, SetupError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
# Megatron-LM's default format (reshards across DP sizes only): megatron-core 0.16.1's others do not
# load with torch's Adam (flattened ShardedTensors refused; Adam's "step" state fails).
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable", "chained_optim_avoid_prefix": True}


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> Optional[int]:
    """The iteration named by ``root``'s tracker file, or None when there is none."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise SetupError(f"{path}: expected an iteration number, found {text!r}") from None


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return dict(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
    )


def _rng_state():
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    return ShardedObject(
        "rng_state",
        state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _set_rng_state(state) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _model_keys(model: List) -> List[str]:
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


@contextlib.contextmanager
def _torch_adam_steps(optimizer, steps: int):
    """Work around megatron-core 0.16.1's distributed optimizer with torch's Adam (no Apex/TE), whose
    load reads Adam's ``step`` before it exists and leaves one ``step`` shared by all parameters:
    a state to read before the load, every parameter its own ``step = steps`` after it."""
    from megatron.core.optimizer import distrib_optimizer

    opts = [] if optimizer is None or distrib_optimizer.HAVE_APEX_OR_TE else [
        opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(opt, distrib_optimizer.DistributedOptimizer)
    ]
    for opt in opts:
        opt.init_state_fn(opt.optimizer, opt.config)
        for state in opt.optimizer.state.values():
            state["step"] = torch.tensor(0.0)
    yield
    for opt in opts:
        for state in opt.optimizer.state.values():
            state["step"] = torch.tensor(float(steps))


def _sharded_state(model: List, optimizer, is_loading: bool, with_rng: bool) -> dict:
    """The model chunks' sharded state, the optimizer's (unless ``optimizer`` is None) and the RNG's."""
    from megatron.core.utils import unwrap_model

    state = {key: unwrap_model(chunk).sharded_state_dict() for key, chunk in zip(_model_keys(model), model)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=_OPTIMIZER_METADATA)
    if with_rng:
        state["rng_state"] = _rng_state()
    return state


def _writer_queue_in_process() -> None:
    """The checkpoint writer's report queue as an in-process one. megatron-core's default, a spawned
    manager process, would outlive a SIGKILLed rank; a multiprocessing queue would race (its ``put``
    is flushed by a feeder thread, megatron reads it back at once with ``get_nowait``). Synchronous
    saves put and get in this process (the write workers report through their own queue)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _write_tracker(root: str, iteration: int) -> None:
    tmp = os.path.join(root, TRACKER_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
    os.replace(tmp, os.path.join(root, TRACKER_FILE))


def save_checkpoint(root: str, iteration: int, model: List, optimizer, scheduler, consumed_samples: int,
                    run_info: dict, model_shape: Optional[dict] = None) -> str:
    """Save on every rank; returns the iteration folder. ``run_info`` (architecture, optimizer kind)
    is stored as is and checked by :func:`check_resume`; ``model_shape`` (the run's
    :class:`~mst_megatron.training.model_config.ModelShape` fields, RoPE settings included) is stored
    for the Hugging Face export. A write that fails (full disk, lost permissions) raises
    :class:`RunError` on the ranks it fails on."""
    from megatron.core import dist_checkpointing

    _writer_queue_in_process()
    path = iteration_dir(root, iteration)
    try:
        if dist.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)  # a stale or partial save of the same iteration
            os.makedirs(path)
        dist.barrier()
        state = _sharded_state(model, optimizer, is_loading=False, with_rng=True)
        state.update(
            iteration=iteration,
            consumed_samples=consumed_samples,
            opt_param_scheduler=scheduler.state_dict(),
            layout=_layout(),
            run_info=run_info,
            model_shape=model_shape,
        )
        dist_checkpointing.save(state, path)
        if dist.get_rank() == 0:
            _write_tracker(root, iteration)
    except OSError as e:
        last = latest_iteration(root) if os.path.isfile(os.path.join(root, TRACKER_FILE)) else None
        raise RunError(f"--save {root}: writing {e.filename or path} failed ({e.strerror or e}); free space there "
                       f"or pick another --save (last complete checkpoint: "
                       f"{'none' if last is None else iteration_dir(root, last)})") from None
    dist.barrier()
    return path


@contextlib.contextmanager
def one_rank_world():
    """A one-rank megatron-core world for the checkpoint tools, ended afterwards; refuses to run
    inside a larger one (the models built here are unsharded)."""
    from mst_megatron.runtime.parallel import destroy_parallel, init_parallel

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise SetupError(f"the checkpoint conversion runs on one rank, not in a world of {dist.get_world_size()}")
        yield
        return
    bridges = init_parallel()
    try:
        yield
    finally:
        destroy_parallel()
        if bridges is not None:
            bridges.restore()


def save_weights(root: str, model, model_shape) -> str:
    """Save one unsharded model chunk (all layers, TP 1) as the weights-only iteration 0 of ``root``."""
    from megatron.core import dist_checkpointing

    _writer_queue_in_process()
    path = iteration_dir(root, 0)
    os.makedirs(path)
    state = dict(
        model=model.sharded_state_dict(),
        iteration=0,
        weights_only=True,
        layout=_layout(),
        run_info={"architecture": model_shape.architecture()},
        model_shape=dict(model_shape.__dict__),
    )
    dist_checkpointing.save(state, path)
    _write_tracker(root, 0)
    return path


def read_common(root: str, step: Optional[int] = None):
    """``(common state, folder)`` of iteration ``step`` (default: the latest) of ``root``, checked
    complete; the common state is what every rank shares (iteration, run_info, model_shape, ...)."""
    ckpt = find_checkpoint(root, None, step)
    return ckpt.common, ckpt.path


def load_weights(path: str, model: List) -> None:
    """Load only the model chunks' weights from the checkpoint folder ``path`` (any kind)."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    sharded = {key: unwrap_model(chunk).sharded_state_dict() for key, chunk in zip(_model_keys(model), model)}
    state = dist_checkpointing.load(sharded, path)
    for key, chunk in zip(_model_keys(model), model):
        unwrap_model(chunk).load_state_dict(state[key])


def _check_weights_only(ckpt: "Checkpoint", architecture: dict) -> None:
    """An imported (weights-only) model must be this run's, vocabulary rows included: padding rows
    would take part in the softmax, i.e. another model."""
    saved = ckpt.common["run_info"]["architecture"]
    if saved["vocab_size"] != architecture["vocab_size"]:
        raise SetupError(
            f"--load {ckpt.path}: the imported model has {saved['vocab_size']} vocabulary rows, this run pads the "
            f"vocabulary to {architecture['vocab_size']} (--make-vocab-size-divisible-by x TP); padding rows "
            f"change the model's softmax: pass --make-vocab-size-divisible-by D with D x TP dividing "
            f"{saved['vocab_size']} (e.g. 1)"
        )
    diff = {k: (saved.get(k), v) for k, v in architecture.items() if saved.get(k) != v}
    if diff:
        raise SetupError(f"--load {ckpt.path}: the checkpoint's model differs from this run's (checkpoint, run): "
                         f"{diff}; pass its model_config.json as --model-config")


@dataclass
class Checkpoint:
    """One complete checkpoint on disk, found before any work starts."""

    root: str
    iteration: int
    common: dict  # the non-sharded state: iteration, consumed_samples, opt_param_scheduler, layout, run_info

    @property
    def path(self) -> str:
        return iteration_dir(self.root, self.iteration)


_ITERATION_DIR = re.compile(r"^iter_(\d{7})$")


def _iterations(root: str) -> List[int]:
    return sorted(int(m[1]) for m in map(_ITERATION_DIR.match, os.listdir(root)) if m)


def _earlier_hint(root: str, iteration: int) -> str:
    earlier = [i for i in _iterations(root) if i < iteration]
    return f"resume an earlier one with --ckpt-step {earlier[-1]}" if earlier else "no earlier checkpoint to resume"


def _check_complete(root: str, iteration: int) -> dict:
    """Every file of the iteration folder is there and whole; returns its common state."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    path = iteration_dir(root, iteration)
    hint = _earlier_hint(root, iteration)
    for name in ("metadata.json", ".metadata"):  # megatron-core 0.16 also writes common.pt, 0.19 does not
        if not os.path.isfile(os.path.join(path, name)):
            raise SetupError(f"--load {root}: {os.path.join(path, name)} is missing, the checkpoint is "
                             f"incomplete (a save interrupted?); {hint}")
    try:
        storage = FileSystemReader(path).read_metadata().storage_data
    except Exception as e:  # noqa: BLE001 (any unpickling error: the file is damaged)
        raise SetupError(f"--load {root}: {os.path.join(path, '.metadata')} cannot be read ({type(e).__name__}); "
                         f"{hint}") from None
    needed = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have is None or have < size:
            state = "is missing" if have is None else f"is truncated ({have} of {size} bytes)"
            raise SetupError(f"--load {root}: checkpoint file {file} {state}; {hint}")
    try:
        return dist_checkpointing.load_common_state_dict(path)
    except Exception as e:  # noqa: BLE001
        raise SetupError(f"--load {root}: the common state of {path} cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); {hint}") from None


def find_checkpoint(load: str, save: Optional[str], step: Optional[int]) -> Optional[Checkpoint]:
    """The checkpoint ``--load`` names (its latest, or ``--ckpt-step``), checked complete.

    ``--load`` may be a root or one of its ``iter_NNNNNNN`` folders. None (start from scratch) only
    when ``--load`` is also ``--save`` and holds no checkpoint yet; anything else that holds none is
    an error, never a silent fresh start.
    """
    root = os.path.normpath(load)
    match = _ITERATION_DIR.match(os.path.basename(root))
    if match and os.path.isdir(root):
        folder_step = int(match[1])
        if step is not None and step != folder_step:
            raise SetupError(f"--load {load} is the folder of iteration {folder_step} but --ckpt-step is {step}: "
                             "give the root with --ckpt-step, or the folder alone")
        root, step = os.path.dirname(root), folder_step
    same_as_save = save is not None and os.path.abspath(root) == os.path.abspath(save)
    if not os.path.exists(root):
        if same_as_save and step is None:
            return None
        raise SetupError(f"--load {load}: no such folder (to start from scratch and save there, "
                         "give --save the same path)")
    if not os.path.isdir(root):
        raise SetupError(f"--load {load}: not a folder (a checkpoint root holding {TRACKER_FILE})")
    iteration = step if step is not None else latest_iteration(root)
    found = _iterations(root)
    if iteration is None:
        if found:
            raise SetupError(f"--load {load}: no {TRACKER_FILE} beside the iteration folders {found}: "
                             "pick one with --ckpt-step")
        if same_as_save:
            return None
        raise SetupError(f"--load {load} holds no checkpoint (no {TRACKER_FILE}); to start from scratch, "
                         "drop --load or give it the --save path")
    if iteration not in found:
        raise SetupError(f"--load {load}: no checkpoint for iteration {iteration} "
                         f"({iteration_dir(root, iteration)} is missing); found iterations {found}")
    return Checkpoint(root, iteration, _check_complete(root, iteration))


def _vocab_hint(saved: int, vocab: int, tensor_model_parallel_size: int) -> str:
    """The --make-vocab-size-divisible-by value that pads ``vocab`` tokens to ``saved`` at this TP."""
    fits = [k for k in range(1, saved + 1)
            if saved % (k * tensor_model_parallel_size) == 0
            and math.ceil(vocab / (k * tensor_model_parallel_size)) * k * tensor_model_parallel_size == saved]
    if not fits:
        return "no --make-vocab-size-divisible-by pads this vocabulary to it at this tensor-parallel size"
    return f"pass --make-vocab-size-divisible-by {fits[-1]} to pad to it at this tensor-parallel size"


# Architecture fields that have a flag of their own (the rest come from --model-config only).
_SHAPE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
# (flag, scheduler state key, samples per unit: True when the key counts samples, not iterations)
_SCHEDULE = (("--lr", "max_lr", False), ("--min-lr", "min_lr", False), ("--lr-warmup-iters", "lr_warmup_steps", True),
             ("--lr-decay-iters", "lr_decay_steps", True), ("--lr-decay-style", "lr_decay_style", False),
             ("--weight-decay", "start_wd", False))


def schedule_differences(args, saved: dict) -> List[str]:
    """``--flag this-run (checkpoint: value)`` for each LR/WD schedule flag that differs."""
    ours = dict(max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
                lr_decay_steps=args.lr_decay_iters, lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay)
    out = []
    for flag, key, in_samples in _SCHEDULE:
        theirs = saved[key] / args.global_batch_size if in_samples else saved[key]
        if theirs != ours[key]:
            shown = int(theirs) if in_samples and float(theirs).is_integer() else theirs
            out.append(f"{flag} {ours[key]} (checkpoint: {shown})")
    return out


def check_resume(args, ckpt: Checkpoint, run_info: dict) -> None:
    """Refuse, before any work, a checkpoint that does not fit this run, naming what differs."""
    common, path = ckpt.common, ckpt.path
    if common.get("weights_only"):  # an import: weights only, a fresh run from iteration 0
        _check_weights_only(ckpt, run_info["architecture"])
        return
    saved = common["run_info"]
    for key, value in run_info.items():
        theirs = saved.get(key)
        if key == "architecture" and theirs is not None:
            for field, mine in value.items():
                if theirs.get(field) != mine:
                    if field == "vocab_size":
                        hint = _vocab_hint(theirs[field], args.vocab_tokens, args.tensor_model_parallel_size)
                    elif field in _SHAPE_FLAGS:
                        hint = f"pass --{field.replace('_', '-')} {theirs.get(field)}"
                    else:
                        hint = "use the checkpoint's model config"
                    raise SetupError(f"--load {path}: the checkpoint's {field} is {theirs.get(field)!r}, this run's "
                                     f"is {mine!r}; {hint}")
        elif theirs != value:
            flag = {"use_distributed_optimizer": "--use-distributed-optimizer", "bf16": "--bf16"}.get(key, key)
            if key == "use_distributed_optimizer" and (args.finetune or args.no_load_optim):
                continue  # the optimizer state is not loaded
            raise SetupError(f"--load {path}: the checkpoint was saved {'with' if theirs else 'without'} {flag}; "
                             f"resume {'with' if theirs else 'without'} it (or --no-load-optim)")
    if args.finetune:
        return
    consumed = common["consumed_samples"]
    if consumed != ckpt.iteration * args.global_batch_size:
        raise SetupError(
            f"--load {path}: the checkpoint consumed {consumed} samples in {ckpt.iteration} steps; "
            f"resume it with its --global-batch-size ({consumed // max(ckpt.iteration, 1)})"
        )
    if args.no_load_optim:
        return
    layout = dict(tensor_model_parallel_size=args.tensor_model_parallel_size,
                  pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    if saved["use_distributed_optimizer"] and common["layout"] != layout:
        differ = ", ".join(f"--{k.replace('_', '-')} {layout[k]} (checkpoint: {v})"
                           for k, v in common["layout"].items() if layout[k] != v)
        raise SetupError(f"--load {path}: distributed-optimizer state loads only under the sizes it was saved "
                         f"with: {differ}; resume with the checkpoint's sizes, or --no-load-optim")
    if not (args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler):
        differ = schedule_differences(args, common["opt_param_scheduler"])
        if differ:
            raise SetupError(
                f"--load {path}: this run's schedule differs from the checkpoint's: {', '.join(differ)}; pass "
                "--override-opt_param-scheduler to continue on this run's schedule from the checkpoint's step, or "
                "--use-checkpoint-opt_param-scheduler to keep the checkpoint's"
            )


def load_checkpoint(ckpt: Checkpoint, model: List, optimizer, scheduler, load_optim: bool = True,
                    load_rng: bool = True):
    """Load ``ckpt`` (checked by :func:`check_resume`) into the model and, when asked, the optimizer,
    scheduler and RNG states (RNG only under the layout it was saved with). Returns
    ``(iteration, consumed_samples)`` as saved. A file that fails to read raises :class:`RunError`
    on every rank, reported by rank 0.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    path = ckpt.path
    if ckpt.common.get("weights_only"):
        load_weights(path, model)
        return 0, 0
    with_rng = load_rng and ckpt.common["layout"] == _layout()
    error = None
    with _torch_adam_steps(optimizer if load_optim else None, ckpt.common["iteration"]):
        try:
            sharded = _sharded_state(model, optimizer if load_optim else None, is_loading=True, with_rng=with_rng)
            state = dist_checkpointing.load(sharded, path)
        except Exception as e:  # noqa: BLE001 (reported as one line below, after every rank knows)
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            raise RunError(f"--load {ckpt.root}: reading {path} failed ({failed}); "
                           f"{_earlier_hint(ckpt.root, ckpt.iteration)}", report=dist.get_rank() == 0)
        for key, chunk in zip(_model_keys(model), model):
            unwrap_model(chunk).load_state_dict(state[key])
        if load_optim:
            with torch.no_grad():  # the distributed optimizer copies into views of the parameters
                optimizer.load_state_dict(state["optimizer"])
    if load_optim:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if with_rng:
        _set_rng_state(state["rng_state"])
    return state["iteration"], state["consumed_samples"]
