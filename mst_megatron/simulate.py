"""Full-scale simulation of one training step: per-GPU peak memory by category and the step's FLOPs,
from the real model code, without computing anything.

    python -m mst_megatron.simulate --model-config llama3-8b --bf16 --seq-length 65536 \\
        --world-size 8 --tensor-model-parallel-size 8 --sequence-parallel \\
        --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 --gpu-memory-gib 80
    python -m mst_megatron.simulate ... --seq-length auto      # the longest sequence that fits

The pretraining job's model, DDP, optimizer and schedule run under ``FakeTensorMode`` on torch's
``fake`` process group, one steady-state step per pipeline stage; the busiest stage is reported.
Memory follows CUDA's kernels where the CPU's differ (``--kernels``); ``--optimizer-cpu-offload``
counts Adam's state as host memory. Not counted: the optimizer's update and memory the dispatcher
does not see beyond the modelled kernel workspaces (leave ``--reserve``).
Method and assumptions: docs/design.md#simulator.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from mst_megatron.layout import LayoutError
from mst_megatron.training import SetupError

GIB = 1024**3
KERNELS = ("cuda", "cpu")
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs")


def build_parser() -> argparse.ArgumentParser:
    """The pretraining example's flags plus the simulator's own."""
    from mst_megatron.training import arguments

    p = arguments.build_parser()
    p.description = "Simulate one training step at full scale under fake tensors (see mst_megatron/simulate.py)."
    for action in p._actions:
        if action.dest == "seq_length":
            action.type, action.default = arguments.int_or_auto_arg, 4096
        if action.dest == "global_batch_size":
            action.default = None
        if action.dest == "micro_batch_size":
            action.default = 1
        if action.dest == "vocab_size":  # the tokenizer flag: here the model's, as no tokenizer is read
            action.help = "the vocabulary (before padding) for a model config whose vocab_size is null"
    g = p.add_argument_group("simulation")
    g.add_argument("--world-size", type=int, default=1, help="GPUs in the job (DP = world / (TP x PP x CP))")
    g.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU")
    g.add_argument("--reserve", type=float, default=0.05,
                   help="share of the GPU kept free for what the simulation does not see (allocator, comms)")
    g.add_argument("--seq-step", type=int, default=1024, help="--seq-length auto: the search's granularity")
    g.add_argument("--optimizer-cpu-offload", action="store_true",
                   help="megatron-core's optimizer_cpu_offload at optimizer_offload_fraction 1: Adam's fp32 master "
                        "weights, moments and gradient copy in host memory (counted as host memory, not run)")
    g.add_argument("--kernels", choices=KERNELS, default="cuda",
                   help="whose kernels the step's memory follows where CPU and GPU differ (RMSNorm, "
                        "flash-attention backward): cuda (the GPU's, default), or cpu (this machine's: to "
                        "check against a real CPU step)")
    g.add_argument("--json", default=None, help="write the report here as JSON")
    return p


def parse(argv: Optional[List[str]] = None):
    """Parsed and checked flags (the pretraining checks, with the simulator's world size), and the shape."""
    from mst_megatron.training import arguments, model_config

    args = build_parser().parse_args(argv)
    if args.world_size < 1:
        raise SetupError(f"--world-size must be >= 1, got {args.world_size}")
    if not 0 <= args.reserve < 1:
        raise SetupError(f"--reserve must be in [0, 1), got {args.reserve}")
    if args.seq_length == "auto" and args.seq_step < 1:
        raise SetupError(f"--seq-step must be >= 1, got {args.seq_step}")
    shape = model_config.load_model_shape(args.model_config, CONFIGS_DIR).replace(**arguments.shape_overrides(args))
    if args.vocab_size is not None:
        shape = shape.replace(vocab_size=args.vocab_size)
    if shape.vocab_size is None:
        raise SetupError(f"--model-config {args.model_config} has vocab_size null (the tokenizer's): give --vocab-size")
    return args, shape


def checked_args(args, shape, seq_length: int):
    """A copy of ``args`` at ``seq_length``, through the pretraining example's own checks."""
    from mst_megatron.training import arguments

    a = argparse.Namespace(**vars(args))
    a.seq_length = seq_length
    a.data_path, a.tokenizer_model = ["simulated"], "simulated"  # no data is read
    if a.global_batch_size is None:
        a.global_batch_size = a.micro_batch_size * arguments.layout_of(a, args.world_size).dp * a.pipeline_model_parallel_size
    arguments.check_args(a, world_size=args.world_size)
    a.max_position_embeddings = max(shape.max_position_embeddings, seq_length)
    arguments.check_shape(a, shape.replace(max_position_embeddings=a.max_position_embeddings))
    return a


def _module_apply(self, fn, recurse=True):
    """``nn.Module._apply`` for fake tensors: casts by ``param.data = ...`` (torch's swap path refuses
    fake tensors, which carry weak references)."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    with torch.no_grad():
        for param in self._parameters.values():
            if param is None:
                continue
            applied = fn(param)
            if applied is not param:
                param.data = applied
        for key, buf in self._buffers.items():
            if buf is not None:
                self._buffers[key] = fn(buf)
    return self


@contextlib.contextmanager
def _simulation_bridges():
    """The bridges named in the module docstring, undone on exit."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as tp_random

    from mst_megatron.ops import offload

    saved = (torch.nn.Module._apply, tp_random.CudaRNGStatesTracker.fork, ps.get_data_parallel_group_gloo,
             ps.get_expert_data_parallel_group_gloo, dist.all_gather_object, offload.HOST_DEVICE)
    torch.nn.Module._apply = _module_apply
    # The fake device is the CPU: offloaded layer inputs go to "meta", counted apart as host memory.
    offload.HOST_DEVICE = "meta"
    tp_random.CudaRNGStatesTracker.fork = lambda self, *a, **k: contextlib.nullcontext()
    # No gloo groups on the fake backend: the optimizer gets the fake data-parallel group instead.
    ps.get_data_parallel_group_gloo = lambda with_context_parallel=False, partial_data_parallel=False: \
        ps.get_data_parallel_group(with_context_parallel=with_context_parallel,
                                   partial_data_parallel=partial_data_parallel)
    ps.get_expert_data_parallel_group_gloo = lambda **kwargs: ps.get_expert_data_parallel_group(**kwargs)
    # Objects cannot travel through fake tensors: every rank is taken to hold this rank's (they agree).
    dist.all_gather_object = lambda out, obj, group=None: out.__setitem__(slice(None), [obj] * len(out))
    try:
        yield
    finally:
        (torch.nn.Module._apply, tp_random.CudaRNGStatesTracker.fork, ps.get_data_parallel_group_gloo,
         ps.get_expert_data_parallel_group_gloo, dist.all_gather_object, offload.HOST_DEVICE) = saved


def _rank_of_stage(a, stage: int) -> int:
    """Global rank 0 of pipeline stage ``stage`` (megatron's default order tp-cp-dp-pp)."""
    return stage * (a.world_size // a.pipeline_model_parallel_size)


def _new_bytes(tensors, seen: set) -> int:
    """Bytes of the storages of ``tensors`` not yet in ``seen`` (which they are added to)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total


def _adam_state(optimizer) -> List[torch.Tensor]:
    """Create Adam's state as ``torch.optim.Adam`` does on its first step (``step``, ``exp_avg``,
    ``exp_avg_sq`` per parameter); return the master parameters and state tensors."""
    held = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                held += [p, state["exp_avg"], state["exp_avg_sq"]]
    return held


def _batches(a, vocab: int):
    """Fake micro-batches in the layout of :mod:`mst_megatron.training.data`."""
    shape = (a.micro_batch_size, a.seq_length)
    while True:
        yield dict(
            tokens=torch.zeros(shape, dtype=torch.long),
            labels=torch.zeros(shape, dtype=torch.long),
            loss_mask=torch.ones(shape, dtype=torch.float32),
            position_ids=torch.arange(a.seq_length).unsqueeze(0).expand(shape).contiguous(),
        )


class _GlobalCounts:
    """In place of ``FlopCounterMode``'s module tracker: every count goes to "Global". No per-module
    counts, and no backward hooks, whose reference cycles hold the graph's tensors until Python's
    cycle collector runs (see :class:`mst_megatron.measure.memory.StepMemTracker`)."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


class _PhaseFlops(FlopCounterMode):
    """``FlopCounterMode`` that splits the count by phase, totals only:

    * ``forward``: outside autograd's backward;
    * ``recompute``: inside backward, an activation checkpoint rerunning its function (megatron's
      ``CheckpointFunction``, torch's non-reentrant checkpoint of the mini-sequence chunks), marked by
      :meth:`marking_recompute` (grad mode cannot tell: a custom ``autograd.Function``'s forward, as
      megatron's linear layers have, runs without it even in a recompute);
    * ``backward``: the rest of backward, the gradient products, including what a custom
      ``autograd.Function``'s backward recomputes itself (the MST head's chunk logits).
    """

    def __init__(self):
        super().__init__(display=False)
        self.mod_tracker = _GlobalCounts()
        self.phase = {"forward": 0, "recompute": 0, "backward": 0}
        self._recomputing = 0

    def _count_flops(self, func_packet, out, args, kwargs):
        before = self.flop_counts["Global"].get(func_packet, 0)
        out = super()._count_flops(func_packet, out, args, kwargs)
        added = self.flop_counts["Global"].get(func_packet, 0) - before
        if torch._C._current_graph_task_id() == -1:
            self.phase["forward"] += added
        else:
            self.phase["recompute" if self._recomputing else "backward"] += added
        return out

    def _marked(self, function):
        def run(*args, **kwargs):
            if torch._C._current_graph_task_id() == -1:  # the checkpoint's first, forward call
                return function(*args, **kwargs)
            self._recomputing += 1
            try:
                return function(*args, **kwargs)
            finally:
                self._recomputing -= 1
        return run

    @contextlib.contextmanager
    def marking_recompute(self):
        """Within: the functions given to megatron's and the chunks' checkpoints count as
        recompute when backward reruns them."""
        from megatron.core.tensor_parallel import random as tp_random

        from mst_megatron.ops import mini_sequence

        saved = (tp_random.CheckpointFunction.forward, mini_sequence.checkpoint)
        forward, checkpoint = saved

        def marked_forward(ctx, run_function, *args):
            return forward(ctx, self._marked(run_function), *args)

        tp_random.CheckpointFunction.forward = staticmethod(marked_forward)
        mini_sequence.checkpoint = lambda function, *args, **kwargs: checkpoint(self._marked(function), *args, **kwargs)
        try:
            yield
        finally:
            tp_random.CheckpointFunction.forward, mini_sequence.checkpoint = staticmethod(forward), checkpoint


def step_report(a, shape, fake: bool = True) -> Dict:
    """Build this rank's model, DDP and optimizer (with Adam's state) and run one step's micro-batches
    through megatron's schedule, under ``FakeTensorMode`` with ``a.kernels``' kernels when ``fake``
    (the real tensors otherwise: the simulator's check); the parallel state must be up. Returns its
    memory and FLOPs."""
    from mst_megatron.measure.memory import StepMemTracker
    from mst_megatron.training import pretrain
    from megatron.core.pipeline_parallel import get_forward_backward_func

    shape_s = shape.replace(max_position_embeddings=a.max_position_embeddings)
    vocab = a.layout.padded_vocab_size(shape.vocab_size, a.make_vocab_size_divisible_by)
    config = pretrain._transformer_config(a, shape_s)
    config.perform_initialization = False
    mst = pretrain.mst_options(a)
    with fake_tensors(a.kernels) if fake else _simulation_bridges():
        model = pretrain.build_model(config, shape_s, vocab, mst, a.use_distributed_optimizer,
                                     check_for_nan_in_grad=False, stock_attention=a.stock_attention)
        optimizer, _ = pretrain.build_optimizer(a, model)
        opt_tensors = _adam_state(optimizer)
        grad_buffers = [buf.grad_data for chunk in model for buf in chunk.buffers]
        param_buffers = [buf.param_data for chunk in model for buf in chunk.buffers if buf.param_data is not None]
        seen = set()
        weights = _new_bytes((p for chunk in model for p in chunk.parameters()), seen)
        grads = _new_bytes(grad_buffers, seen)
        opt_bytes = _new_bytes(opt_tensors, seen)  # fp32 master weights (bf16) and Adam's moments
        other = _new_bytes(param_buffers, seen)
        if a.optimizer_cpu_offload:  # fp32 master weights, moments and gradients live in host memory
            host_optimizer = sum(t.numel() * t.element_size() for t in opt_tensors[1::3] + opt_tensors[2::3])
            host_optimizer += sum(2 * 4 * t.numel() for t in opt_tensors[::3])
            opt_bytes, opt_tensors = 0, []
        else:
            host_optimizer = 0
        static = weights + grads + opt_bytes + other
        forward_backward = get_forward_backward_func()
        iterators = [_batches(a, vocab) for _ in model]
        tracker, flops = StepMemTracker(), _PhaseFlops()
        # What exists before the step is tracked as such: otherwise the first in-place add into the
        # gradient buffer would count the whole buffer again, as a temporary of backward.
        tracker.track_external(*model, *grad_buffers, *param_buffers, *opt_tensors)
        for chunk in model:
            chunk.zero_grad_buffer()
        with tracker, flops, flops.marking_recompute(), kernel_workspaces(a.kernels if fake else "cpu"):
            forward_backward(forward_step_func=pretrain.forward_step, data_iterator=iterators, model=model,
                             num_microbatches=a.num_microbatches, seq_length=a.seq_length,
                             micro_batch_size=a.micro_batch_size, forward_only=False)
        snapshot = tracker.get_tracker_snapshot("peak")
    step, host = {}, host_optimizer  # the static tensors are in the snapshot too (tracked as external)
    for device, dev_snap in snapshot.items():
        if torch.device(device).type == "meta":  # the offload's host memory (see _simulation_bridges)
            host += int(dev_snap.get("Total", 0))
            continue
        for k, v in dev_snap.items():
            name = "total" if k == "Total" else getattr(k, "name", str(k))
            step[name] = step.get(name, 0) + int(v)
    return dict(
        memory=dict(weights=weights, grads=grads, optimizer=opt_bytes, other_static=other,
                    activations=step.get("ACT", 0),
                    temporaries=step.get("TEMP", 0) + step.get("GRAD", 0),
                    step_peak=step.get("total", 0) - static, peak=step.get("total", 0), host=host,
                    host_optimizer=host_optimizer),
        flops=dict(**flops.phase, total=flops.get_total_flops()),
    )


@contextlib.contextmanager
def fake_world(rank: int, world_size: int, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, cp: int = 1,
               hierarchical_cp_sizes: Optional[List[int]] = None, seed: int = 1234):
    """megatron-core's parallel state for ``rank`` of a ``world_size`` layout on torch's ``fake``
    process group (collectives return the right shapes, no data), torn down on exit."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mst_megatron.runtime import cpu_compat
    from mst_megatron.runtime.quiet import import_megatron_quietly

    import_megatron_quietly()
    cpu_compat.install()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
                                     hierarchical_context_parallel_sizes=hierarchical_cp_sizes,
                                     create_gloo_process_groups=False)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


class _FusedRMSNorm(torch.autograd.Function):
    """``rms_norm``'s memory as CUDA runs it, on fake tensors: one fused kernel, whose output has the
    input's dtype and whose backward keeps the input, the weight and an fp32 reciprocal RMS per row.
    On the CPU device torch decomposes it into element-wise ops whose fp32 ``[s, b, h]`` results
    autograd keeps (the ``cpu`` kernels). No values: fake tensors carry none."""

    @staticmethod
    def forward(ctx, input_, weight, dims: int):
        rstd = input_.new_empty(tuple(input_.shape[:-dims]) + (1,) * dims, dtype=torch.float32)
        ctx.save_for_backward(input_, weight, rstd)
        return torch.empty_like(input_)

    @staticmethod
    def backward(ctx, grad):
        input_, weight, _ = ctx.saved_tensors
        return torch.empty_like(input_), None if weight is None else torch.empty_like(weight), None


def _cuda_rms_norm(input, normalized_shape, weight=None, eps=None):
    return _FusedRMSNorm.apply(input, weight, len(normalized_shape))


class _FlashWorkspaces(TorchDispatchMode):
    """For the length of each flash-attention backward, the buffers CUDA's kernel (FlashAttention-2,
    as torch ships it) takes from the allocator beside its outputs, unseen by the dispatcher: the fp32
    ``softmax_d [b, h, s_q]`` and ``dq_accum [b, s_q, h, d]`` (``s_q`` rounded up to 128, ``d`` to 32)
    and, for grouped-query K/V, ``dK``/``dV`` with every query head ``[b, s_k, h, d]`` before their
    sum over the group. The CPU kernel that stands in for it under fake tensors takes none."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
            return func(*args, **(kwargs or {}))
        _, q, k = args[:3]
        b, h, s, d = q.shape
        s_rounded, d_rounded = -(-s // 128) * 128, -(-d // 32) * 32
        held = [q.new_empty((b, h, s_rounded), dtype=torch.float32),
                q.new_empty((b, s_rounded, h, d_rounded), dtype=torch.float32)]
        if k.size(1) != h:
            held += [k.new_empty((b, k.size(2), h, d)) for _ in range(2)]
        out = func(*args, **(kwargs or {}))
        del held
        return out


def kernel_workspaces(kernels: str):
    """Inside a memory tracker (entered after it): the workspaces ``kernels``' attention backward
    takes besides its outputs (:class:`_FlashWorkspaces` for ``cuda``, none for ``cpu``)."""
    return _FlashWorkspaces() if kernels == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def fake_tensors(kernels: str = "cuda"):
    """``FakeTensorMode`` with the simulation's bridges (module docstring): build and run models inside.
    ``kernels`` (:data:`KERNELS`): where the CPU's kernels keep other tensors than the GPU's (the
    RMSNorm), whose to follow."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    saved = torch.nn.functional.rms_norm
    if kernels == "cuda":
        torch.nn.functional.rms_norm = _cuda_rms_norm
    try:
        with _simulation_bridges(), FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        torch.nn.functional.rms_norm = saved


def simulate_rank(a, shape, rank: int) -> Dict:
    """One step of ``rank`` in ``a``'s layout (``a`` from :func:`checked_args`) on the fake process group."""
    with fake_world(rank, a.world_size, a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                    a.virtual_pipeline_model_parallel_size, a.context_parallel_size,
                    a.hierarchical_context_parallel_sizes, a.seed):
        report = step_report(a, shape, fake=True)
    return dict(rank=rank, pipeline_stage=rank // (a.world_size // a.pipeline_model_parallel_size), **report)


def _budget(args) -> float:
    """Bytes a step may peak at: the GPU less the reserve."""
    return args.gpu_memory_gib * GIB * (1 - args.reserve)


def simulate(args, shape, seq_length: int) -> Dict:
    """Every pipeline stage's rank 0 at ``seq_length``; the busiest (highest peak) first."""
    a = checked_args(args, shape, seq_length)
    t0 = time.time()
    ranks = [simulate_rank(a, shape, _rank_of_stage(a, s)) for s in range(a.pipeline_model_parallel_size)]
    ranks.sort(key=lambda r: -r["memory"]["peak"])
    budget = _budget(args)
    return dict(seq_length=seq_length, busiest=ranks[0], ranks=ranks, fits=ranks[0]["memory"]["peak"] <= budget,
                budget_bytes=int(budget), seconds=time.time() - t0, layout=_layout(a))


def _layout(a) -> Dict:
    return dict(world_size=a.world_size, tp=a.tensor_model_parallel_size, pp=a.pipeline_model_parallel_size,
                vpp=a.virtual_pipeline_model_parallel_size, cp=a.context_parallel_size,
                cp_comm_type=a.cp_comm_type, hierarchical_cp_sizes=a.hierarchical_context_parallel_sizes,
                dp=a.data_parallel_size,
                sp=a.sequence_parallel, micro_batch_size=a.micro_batch_size, num_microbatches=a.num_microbatches,
                recompute=a.recompute_granularity, mst=not a.no_mst,
                stock_attention=a.stock_attention if a.no_mst else None, bf16=a.bf16,
                distributed_optimizer=a.use_distributed_optimizer, optimizer_cpu_offload=a.optimizer_cpu_offload,
                offload_layer_inputs=a.offload_layer_inputs)


def largest_fitting(peak_of: Callable[[int], int], budget: int, first: int = 1) -> Tuple[int, List[Tuple[int, int]]]:
    """The largest ``n >= 1`` with ``peak_of(n) <= budget`` (0 if not even ``n = 1`` fits), for a
    ``peak_of`` that does not decrease with ``n``, and every ``(n, peak)`` evaluated, in order.

    A peak that grows about linearly with ``n`` (a step's with the sequence length) is found in a few
    evaluations: from ``first`` and ``2 * first``, the line through the two nearest points fitting
    and not fitting (or the two largest fitting) guesses the next ``n``; a guess that fails to halve
    the bracket is followed by a bisection, so the worst case stays logarithmic. When ``first`` does
    not fit, ``n = 1`` is tried next: if it does not fit either, nothing does (one evaluation, not a
    bisection down to 1, for a layout whose static memory alone is over the budget).
    """
    peaks: Dict[int, int] = {}
    tried: List[Tuple[int, int]] = []

    def fits(n: int) -> bool:
        if n not in peaks:
            peaks[n] = int(peak_of(n))
            tried.append((n, peaks[n]))
        return peaks[n] <= budget

    def through(a: int, b: int) -> float:
        """Where the line through ``(a, peak(a))`` and ``(b, peak(b))`` reaches the budget."""
        slope = (peaks[b] - peaks[a]) / (b - a)
        return b + (budget - peaks[b]) / slope if slope > 0 else math.inf

    first = max(1, first)
    lo, hi = 0, None  # lo fits (0: nothing yet), hi does not (None: not found yet)
    for n in (first, 2 * first):
        if not fits(n):
            hi = n
            break
        lo = n
    if hi is None:  # both fit: extrapolate (at most 16x at a time) until one does not
        prev = first
        while hi is None:
            n = max(int(min(through(prev, lo), 16 * lo)), lo + 1)
            prev = lo
            if fits(n):
                lo = n
            else:
                hi = n
    bisect_next = False
    while hi - lo > 1:
        width = hi - lo
        if lo == 0:
            n = 1
        elif bisect_next:
            n = (lo + hi) // 2
        else:
            n = min(max(int(through(lo, hi)), lo + 1), hi - 1)
        if fits(n):
            lo = n
        else:
            hi = n
        bisect_next = not bisect_next and (hi - lo) * 2 > width
    return lo, tried


def search_unit(args) -> int:
    """The lengths ``--seq-length auto`` tries are multiples of this: ``--seq-step`` and the layout's
    sequence divisor."""
    from mst_megatron.training import arguments

    return math.lcm(args.seq_step, arguments.layout_of(args, args.world_size).seq_len_divisor)


def longest_fitting(args, shape) -> Dict:
    """``--seq-length auto``: the longest multiple of :func:`search_unit` whose step fits, by
    :func:`largest_fitting` from 16384 tokens; the fitting result (None if none fits) and every
    length tried with its peak."""
    unit = search_unit(args)
    results: Dict[int, Dict] = {}

    def peak_of(n: int) -> int:
        results[n] = simulate(args, shape, n * unit)
        return results[n]["busiest"]["memory"]["peak"]

    n, tried = largest_fitting(peak_of, _budget(args), first=max(1, 16384 // unit))
    return dict(best=results.get(n), tried=[(k * unit, peak) for k, peak in tried])


def _print(report: Dict) -> None:
    b, m = report["busiest"], report["busiest"]["memory"]
    print(f"S={report['seq_length']} layout {report['layout']}")
    print(f"busiest rank {b['rank']} (pipeline stage {b['pipeline_stage']}): peak {m['peak'] / GIB:.2f} GiB "
          f"of a {report['budget_bytes'] / GIB:.2f} GiB budget -> {'fits' if report['fits'] else 'does NOT fit'}")
    for k in ("weights", "grads", "optimizer", "other_static", "activations", "temporaries"):
        print(f"  {k:13s} {m[k] / GIB:9.2f} GiB")
    if m["host"]:
        print(f"  host memory  {m['host'] / GIB:9.2f} GiB (offloaded layer inputs and optimizer, not in the peak; "
              f"optimizer {m['host_optimizer'] / GIB:.2f} GiB)")
    f = b["flops"]
    print(f"  FLOPs: forward {f['forward'] / 1e12:.4g} T, recompute {f['recompute'] / 1e12:.4g} T, backward "
          f"{f['backward'] / 1e12:.4g} T, total {f['total'] / 1e12:.4g} T  ({report['seconds']:.1f} s simulated)")


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args, shape = parse(argv)
        if args.seq_length == "auto":
            found = longest_fitting(args, shape)
            report = found["best"]
            for s, peak in found["tried"]:
                print(f"  tried S={s}: peak {peak / GIB:.2f} GiB")
            if report is None:
                print("no sequence length fits")
                return 1
        else:
            report = simulate(args, shape, args.seq_length)
    except (SetupError, LayoutError) as e:
        print(f"simulate: error: {e}", file=sys.stderr)
        return 2
    _print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
