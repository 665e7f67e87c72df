"""CPU compatibility layer: megatron-core's stock GPT training path without CUDA
(why and how it is scoped: docs/design.md#cpu-compatibility-layer).

:func:`install` refuses when CUDA is present or megatron-core is outside :data:`SUPPORTED_MCORE`,
and returns a :class:`CpuBridges` handle whose :meth:`~CpuBridges.restore` undoes every replacement.
The bridges, each confined to named megatron-core modules or methods:

1. ``torch`` as seen by :data:`BRIDGED_MODULES` is a proxy: CUDA factories build on the CPU, and
   ``torch.cuda``'s device, sync and RNG calls act on the CPU (not thread-local, unlike a mode).
2. ``tensor_parallel.random``'s device RNG state get/set use the CPU generator.
3. ``LanguageModule.setup_embeddings_and_output_layer``: ``Tensor.cuda()`` is the identity.
4. ``optimizer.clip_grad_by_total_norm_fp32``: the same scaling without its CUDA type assertion.
5. The mixed-precision and distributed optimizers' ``__init__``: CPU tensors report CUDA type names.
6. RoPE's ``get_pos_emb_on_this_cp_rank`` (under each name it is imported as): ``.cuda()`` is the identity.
"""

import contextlib
import functools
import importlib
import logging
import re
import types
from typing import Optional

import torch

# Each module, and the CUDA-only calls in it that the torch proxy bridges.
BRIDGED_MODULES = {
    "megatron.core.tensor_parallel.random": "torch.cuda.get_rng_state/manual_seed (RNG tracker add, seeding)",
    "megatron.core.tensor_parallel.layers": "parameters allocated on torch.cuda.current_device()",
    "megatron.core.tensor_parallel.mappings": "sequence-parallel all-gather/reduce-scatter output buffers",
    "megatron.core.utils": "GlobalMemoryBuffer (sequence-parallel all-gather buffer) on current_device()",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "RoPE inv_freq moved to current_device()",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": "YaRN inv_freq moved to current_device()",
    "megatron.core.models.common.embeddings.rope_utils": "CP chunk index built with pin_memory=True",
    "megatron.core.transformer.utils": 'get_default_causal_mask allocates on device="cuda"',
    "megatron.core.transformer.dot_product_attention": "attention buffers on current_device()",
    "megatron.core.pipeline_parallel.schedules": 'total_num_tokens = torch.zeros(..., device="cuda")',
    "megatron.core.pipeline_parallel.p2p_communication": "p2p receive buffers and torch.cuda.synchronize()",
    "megatron.core.distributed.param_and_grad_buffer": "grad buffers on current_device()",
    "megatron.core.distributed.distributed_data_parallel": "torch.cuda.Stream for overlapped comms",
    "megatron.core.optimizer.optimizer": "found_inf flag on device='cuda'",
    "megatron.core.optimizer.clip_grads": "grad-norm scratch tensors on device='cuda'",
    "megatron.core.optimizer.distrib_optimizer": "shard buffers on current_device()",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "torch.cuda.synchronize() before writes",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save-verification flags on device='cuda'",
    "megatron.core.dist_checkpointing.strategies.async_utils": "async-save status flags on current_device()",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "torch.cuda.synchronize() around exchanges",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict": "torch.cuda.synchronize()",
}

_FACTORIES = ("empty", "empty_like", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint", "as_tensor")
_CPU = torch.device("cpu")
SUPPORTED_MCORE = ">=0.16.1,<0.20"
_SUPPORTED_RANGE = ((0, 16, 1), (0, 20, 0))
_active = None  # the installed CpuBridges


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):
        return True  # a bare ordinal means a CUDA device to torch
    return device is not None and torch.device(device).type == "cuda"


def _factory_on_cpu(factory):
    def build(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        kwargs.pop("pin_memory", None)  # pinning needs CUDA; it is only a transfer optimisation
        return factory(*args, **kwargs)

    build.__name__ = factory.__name__
    return build


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as the bridged modules see it: device, sync and RNG calls act on the CPU."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.current_device = lambda: _CPU
        self.synchronize = lambda *a, **k: None
        self.empty_cache = lambda: None
        self.get_rng_state = lambda *a, **k: torch.get_rng_state()
        self.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
        self.manual_seed = torch.manual_seed
        self.manual_seed_all = torch.manual_seed
        self.Stream = lambda *a, **k: None
        self.stream = lambda *a, **k: contextlib.nullcontext()
        # On a CPU all work is in order: waiting on a stream or event is a no-op.
        stream = types.SimpleNamespace(**{name: (lambda *a, **k: None) for name in
                                          ("wait_stream", "wait_event", "record_event", "synchronize")})
        self.default_stream = lambda *a, **k: stream
        self.current_stream = lambda *a, **k: stream

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """``torch`` as the bridged modules see it (see the module docstring, bridge 1)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _get_device_rng_state(device="cuda", clone=False, graph_safe=False):
    """Replaces ``tensor_parallel.random._get_cuda_rng_state``: the CPU generator is the device's."""
    return torch.get_rng_state()


def _set_device_rng_state(new_state, device=-1, graph_safe=False):
    """Replaces ``tensor_parallel.random._set_cuda_rng_state``."""
    torch.set_rng_state(new_state)


class _DropCpuRngWarning(logging.Filter):
    """``fork()`` warns when the CPU RNG changes inside a device-RNG context; here they are one."""

    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


_DROP_CPU_RNG_WARNING = _DropCpuRngWarning()


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


@contextlib.contextmanager
def _tensor_type_names_cuda():
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        name = original(self, dtype, non_blocking, **kwargs)
        if dtype is None and self.device.type == "cpu":
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _run_inside(bridges: "CpuBridges", owner, name: str, context) -> None:
    """Make ``owner.<name>`` (a class's method or a module's function) run inside ``context()``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def bridged(*args, **kwargs):
        with context():
            return original(*args, **kwargs)

    bridges.replace(owner, name, bridged)


def _bridge_cp_rope_slicing(bridges: "CpuBridges") -> None:
    """Bridge 6: the CP slicing function runs with ``Tensor.cuda`` as the identity, under each name
    it was imported as."""
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding

    _run_inside(bridges, rope_utils, "get_pos_emb_on_this_cp_rank", _tensor_cuda_is_identity)
    for module in (rotary_pos_embedding, yarn_rotary_pos_embedding):
        bridges.replace(module, "get_pos_emb_on_this_cp_rank", rope_utils.get_pos_emb_on_this_cp_rank)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Replaces ``optimizer.clip_grad_by_total_norm_fp32``: same in-place scaling, any device."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _qualified_name(owner) -> str:
    if isinstance(owner, types.ModuleType):
        return owner.__name__
    return f"{owner.__module__}.{owner.__qualname__}"


class CpuBridges:
    """The installed bridges: every ``(owner, attribute, original value)`` that :func:`install`
    replaced, in order. :meth:`restore` puts them back (last first) and uninstalls."""

    def __init__(self):
        self.replaced = []

    def replace(self, owner, name: str, value) -> None:
        if not hasattr(owner, name):
            raise RuntimeError(
                f"cpu_compat: {getattr(owner, '__name__', owner)}.{name} does not exist in this "
                f"megatron-core; the CPU bridges were written for megatron-core {SUPPORTED_MCORE}"
            )
        self.replaced.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def touched(self) -> list:
        """``"owner.attribute"`` names of everything replaced, in order."""
        return [f"{_qualified_name(owner)}.{name}" for owner, name, _ in self.replaced]

    def restore(self) -> None:
        global _active
        for owner, name, original in reversed(self.replaced):
            setattr(owner, name, original)
        self.replaced.clear()
        if _active is self:
            logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(_DROP_CPU_RNG_WARNING)
            _active = None


def active() -> Optional[CpuBridges]:
    """The installed bridges' handle, or None."""
    return _active


def check_mcore_version(version: str) -> None:
    """Raise unless ``version`` (megatron-core's ``__version__``) is one the bridges were written for."""
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    low, high = _SUPPORTED_RANGE
    if not low <= parts < high:
        raise RuntimeError(
            f"cpu_compat: megatron-core {version} is not supported by the CPU bridges (written for "
            f"{SUPPORTED_MCORE}); run on a GPU or install a supported megatron-core"
        )


def install() -> CpuBridges:
    """Install the bridges (idempotent: a second call returns the same handle). Refuses when CUDA
    is present and on a megatron-core version outside :data:`SUPPORTED_MCORE`."""
    global _active
    if _active is not None:
        return _active
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.install: CUDA is available; the CPU bridges are for CUDA-less machines only")
    import megatron.core

    check_mcore_version(megatron.core.__version__)
    from megatron.core.models.common.language_module import language_module
    from megatron.core.optimizer import distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random as tp_random

    bridges = CpuBridges()
    try:
        proxy = _TorchOnCpu()
        for name in BRIDGED_MODULES:
            bridges.replace(importlib.import_module(name), "torch", proxy)
        bridges.replace(tp_random, "_get_cuda_rng_state", _get_device_rng_state)
        bridges.replace(tp_random, "_set_cuda_rng_state", _set_device_rng_state)
        _run_inside(bridges, language_module.LanguageModule, "setup_embeddings_and_output_layer",
                    _tensor_cuda_is_identity)
        bridges.replace(optimizer, "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32)
        _run_inside(bridges, optimizer.Float16OptimizerWithFloat16Params, "__init__", _tensor_type_names_cuda)
        _run_inside(bridges, distrib_optimizer.DistributedOptimizer, "__init__", _tensor_type_names_cuda)
        _bridge_cp_rope_slicing(bridges)
    except BaseException:
        bridges.restore()
        raise
    logging.getLogger(tp_random.__name__).addFilter(_DROP_CPU_RNG_WARNING)
    _active = bridges
    return bridges
