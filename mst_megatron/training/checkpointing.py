"""Save and resume training with megatron-core ``dist_checkpointing``, in Megatron-LM's layout.

``<root>/iter_0000010/`` holds one checkpoint (sharded model and optimizer state, scheduler state,
iteration, consumed samples, RNG states); ``<root>/latest_checkpointed_iteration.txt`` names the
newest complete one. Tensors are saved by their global (unsharded) identity, so a checkpoint loads
under another tensor/pipeline/data-parallel layout, and into a stock megatron-core ``GPTModel``
(MST keeps the stock state-dict keys by design). RNG states are per (pipeline, tensor) rank and
are restored only when that layout is unchanged.

A weights-only checkpoint (:func:`save_weights`, written by the Hugging Face import) holds the model
and its shape at iteration 0 and no optimizer state: ``--load`` starts a fresh run from its weights,
and the run's own saves into the same root then resume as usual.
"""

import contextlib
import os
import random
import shutil
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from mst_megatron.training import SetupError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
# The distributed optimizer's checkpoint format, Megatron-LM's default: a parallel save with no
# gather, resharded across data-parallel sizes only. megatron-core 0.16.1's other formats do not load
# with torch's Adam (no Apex/TE): "fully_sharded_model_space" (its default) needs flattened
# ShardedTensors, which 0.16 refuses, and "fully_reshardable" fails on Adam's "step" state.
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
    """Work around megatron-core 0.16.1's distributed optimizer with torch's Adam (no Apex/TE).

    Its loading path reads Adam's ``step`` from the optimizer state, which does not exist before a
    first step; restores ``step`` from that pre-load state rather than the checkpoint; and leaves one
    ``step`` tensor shared by all parameters, which Adam then increments once per parameter. Give a
    fresh optimizer a state to read before the load, and every parameter its own ``step`` (the
    checkpoint's count: every step of this loop updates, no fp16 loss scaling skips one) after it.
    """
    from megatron.core.optimizer import distrib_optimizer

    opts = [] if distrib_optimizer.HAVE_APEX_OR_TE else [
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
    from megatron.core.utils import unwrap_model

    state = {key: unwrap_model(chunk).sharded_state_dict() for key, chunk in zip(_model_keys(model), model)}
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=_OPTIMIZER_METADATA)
    if with_rng:
        state["rng_state"] = _rng_state()
    return state


def _write_tracker(root: str, iteration: int) -> None:
    tmp = os.path.join(root, TRACKER_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
    os.replace(tmp, os.path.join(root, TRACKER_FILE))


def save_checkpoint(root: str, iteration: int, model: List, optimizer, scheduler, consumed_samples: int,
                    run_info: dict, model_shape: Optional[dict] = None) -> str:
    """Save on every rank; returns the iteration folder. ``run_info`` (architecture, optimizer kind)
    is stored as is and checked by :func:`load_checkpoint`; ``model_shape`` (the run's
    :class:`~mst_megatron.training.model_config.ModelShape` fields, RoPE settings included) is stored
    for the Hugging Face export."""
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, iteration)
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
    """``(common state, folder)`` of iteration ``step`` (default: the latest) of ``root``; the common
    state is what every rank shares (iteration, run_info, model_shape, ...), read without a world."""
    iteration = step if step is not None else latest_iteration(root)
    if iteration is None:
        raise SetupError(f"--load {root}: no checkpoint ({TRACKER_FILE} is missing)")
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, iteration)
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise SetupError(f"--load {root}: no checkpoint for iteration {iteration} ({path} is missing or incomplete)")
    return dist_checkpointing.load_common_state_dict(path), path


def check_weights_only(root: str, step: Optional[int], architecture: dict) -> None:
    """Before any work: when ``root``'s checkpoint to load is weights-only, its model must be this
    run's, vocabulary rows included (padding rows would take part in the softmax: another model)."""
    if latest_iteration(root) is None and step is None:
        return
    common, path = read_common(root, step)
    if not common.get("weights_only"):
        return
    saved = common["run_info"]["architecture"]
    if saved["vocab_size"] != architecture["vocab_size"]:
        raise SetupError(
            f"--load {path}: the imported model has {saved['vocab_size']} vocabulary rows, this run pads the "
            f"vocabulary to {architecture['vocab_size']} (--make-vocab-size-divisible-by x TP); padding rows "
            f"change the model's softmax: pass --make-vocab-size-divisible-by D with D x TP dividing "
            f"{saved['vocab_size']} (e.g. 1)"
        )
    diff = {k: (saved.get(k), v) for k, v in architecture.items() if saved.get(k) != v}
    if diff:
        raise SetupError(f"--load {path}: the checkpoint's model differs from this run's (checkpoint, run): {diff}; "
                         "pass its model_config.json as --model-config")


def load_weights(path: str, model: List) -> None:
    """Load only the model chunks' weights from the checkpoint folder ``path`` (any kind)."""
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    sharded = {key: unwrap_model(chunk).sharded_state_dict() for key, chunk in zip(_model_keys(model), model)}
    state = dist_checkpointing.load(sharded, path)
    for key, chunk in zip(_model_keys(model), model):
        unwrap_model(chunk).load_state_dict(state[key])


def load_checkpoint(root: str, model: List, optimizer, scheduler, run_info: dict, step: Optional[int] = None):
    """Load ``root``'s latest checkpoint (or iteration ``step``) into the model, optimizer and scheduler.

    Returns ``(iteration, consumed_samples)``, or None when ``root`` holds no checkpoint and
    ``step`` is None (a fresh run with ``--load`` pointing where ``--save`` will write).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.utils import unwrap_model

    iteration = step if step is not None else latest_iteration(root)
    if iteration is None:
        return None
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise SetupError(f"--load {root}: no checkpoint for iteration {iteration} ({path} is missing)")
    common = dist_checkpointing.load_common_state_dict(path)
    if common.get("weights_only"):  # checked by check_weights_only before any work
        load_weights(path, model)
        return 0, 0
    saved = common["run_info"]
    for key, value in run_info.items():
        if saved.get(key) != value:
            raise SetupError(
                f"--load {path}: the checkpoint's {key} is {saved.get(key)!r}, this run's is {value!r}"
            )
    same_layout = common["layout"] == _layout()
    if saved["use_distributed_optimizer"] and not same_layout:
        raise SetupError(
            f"--load {path}: distributed-optimizer state saved under {common['layout']} loads only "
            f"under the same sizes (this run: {_layout()}); data-parallel size may change"
        )
    with _torch_adam_steps(optimizer, common["iteration"]):
        state = dist_checkpointing.load(_sharded_state(model, optimizer, is_loading=True, with_rng=same_layout), path)
        for key, chunk in zip(_model_keys(model), model):
            unwrap_model(chunk).load_state_dict(state[key])
        with torch.no_grad():  # the distributed optimizer copies into views of the parameters
            optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["opt_param_scheduler"])
    if same_layout:
        _set_rng_state(state["rng_state"])
    return state["iteration"], state["consumed_samples"]
