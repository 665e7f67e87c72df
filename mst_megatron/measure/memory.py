"""Peak-memory measurement for benchmarks, on CPU or GPU, around ``torch``'s ``MemTracker``.

Categories are assigned when a storage is first seen (``ACT`` outside autograd's backward, ``TEMP``
inside it, ``GRAD`` once a parameter's gradient is accumulated, ``OPT`` in ``optimizer.step``,
``OTH`` for tensors that existed before the step); the breakdown is the snapshot at the total's peak.
Memory that bypasses the dispatcher is not seen (``allocator=True`` adds the allocator's figure).
Method and caveats: docs/design.md#measurement.
"""

import gc
import weakref
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed._tools.mod_tracker import ModTracker

__all__ = ["StepMemTracker", "measure_peak", "measure_cuda_peak", "format_bytes", "mem_available_bytes"]

_TOTAL_KEY = "Total"
_CATEGORIES = ("PARAM", "BUFFER", "GRAD", "ACT", "TEMP", "OPT", "OTH")


class _ForwardModTracker(ModTracker):
    """``ModTracker`` without its backward hooks: the module hierarchy and the user hooks of forward
    (and of the recompute in backward), but no ``register_multi_grad_hook`` on every module's inputs
    and outputs. Those hooks form reference cycles with the autograd graph (the hook holds the
    nodes, the nodes hold the hook) that keep the graph's tensors alive until Python's cycle
    collector runs, so a measured peak would depend on when it runs; training has no such hooks."""

    def _fw_pre_hook(self, mod, input):
        self._get_append_fn(weakref.ref(mod), self._get_mod_name(mod), False)()
        if self._user_pre_fw_hook is not None:
            self._user_pre_fw_hook(mod, input)

    def _fw_post_hook(self, mod, input, output):
        if self._user_post_fw_hook is not None:
            self._user_post_fw_hook(mod, input, output)
        self._get_pop_fn(weakref.ref(mod), self._get_mod_name(mod), False)()


class StepMemTracker(MemTracker):
    """``MemTracker`` for one whole step: the peak of the step (total and categories) only, no
    per-module peaks (they cost a pass over every module at every op: most of a full-size
    simulation's time) and no module hooks in backward (:class:`_ForwardModTracker`); a module may
    be called more than once at top level (a chunked op)."""

    def __init__(self):
        super().__init__()
        self._mod_tracker = _ForwardModTracker()

    def _update_peak_stats(self, peak_state):
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(dev_snap)

    def _pre_fw_hook(self, module, inputs):
        try:
            super()._pre_fw_hook(module, inputs)
        except NotImplementedError:
            # A second top-level forward of a seen module (a chunked op): already tracked.
            pass

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        # megatron's DDP shadows Module.buffers() with its gradient buffers: track the wrapped module.
        if not callable(module.buffers):
            module = module.module
        return super()._track_module_params_and_buffers(module, install_grad_hooks)


def mem_available_bytes() -> int:
    """The kernel's estimate of host memory available to a new allocation without swapping
    (``MemAvailable`` of ``/proc/meminfo``), in bytes; ``RuntimeError`` where it has no such line."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def _as_tuple(obj) -> tuple:
    if obj is None:
        return ()
    if isinstance(obj, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer)):
        return (obj,)
    return tuple(obj)


def _key(k) -> str:
    if k == _TOTAL_KEY:
        return "total"
    return getattr(k, "name", str(k))


def _allocator_peak_delta(prof) -> int:
    """Highest net allocation (bytes) above the level at the start of profiling, all devices."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


def measure_peak(
    step: Callable[[], Any],
    modules_or_tensors: Union[torch.nn.Module, torch.Tensor, Iterable] = (),
    optimizer: Optional[torch.optim.Optimizer] = None,
    device: Optional[Union[str, torch.device]] = None,
    allocator: bool = False,
) -> Dict[str, int]:
    """Run ``step()`` once under a memory tracker; return its peak, in bytes, by category.

    Args:
        step: called once with no arguments; its return value is dropped.
        modules_or_tensors: modules (parameters and buffers), tensors (inputs, upstream gradients, ...)
            that exist before the step and should count towards the peak.
        optimizer: its current state tensors are counted; state created in ``optimizer.step()`` inside
            ``step`` is counted as ``OPT`` either way.
        device: report only this device. ``None``: the sum over the devices seen (each device's own
            peak; with one device this is that device's peak).
        allocator: also run ``torch.profiler`` with ``profile_memory=True`` and report, as
            ``allocator_peak_delta``, the allocator's highest net allocation during the step above its
            level at the start (every allocation, including ones the tracker cannot see, but nothing that
            existed before the step).

    Returns:
        ``{"PARAM", "BUFFER", "GRAD", "ACT", "TEMP", "OPT", "OTH": int, "total": int}``: the breakdown
        at the moment the total peaked (the categories sum to ``total``); plus
        ``"allocator_peak_delta"`` when ``allocator`` is set. Plain ints, string keys.
    """
    tracker = StepMemTracker()
    externals = _as_tuple(modules_or_tensors) + _as_tuple(optimizer)
    if externals:
        tracker.track_external(*externals)

    # Free garbage first: objects from earlier code collected during the step would show as frees of
    # memory the step never allocated (the allocator figure would drop by their size).
    gc.collect()
    prof = None
    if allocator:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        prof.__enter__()
    try:
        with tracker:
            step()
        peak_snapshot = tracker.get_tracker_snapshot("peak")
    finally:
        if prof is not None:
            prof.__exit__(None, None, None)
        # The tracker's module and multi-grad hooks form reference cycles with autograd nodes that keep
        # some tensors (e.g. a weight gradient) alive until the next collection: collect them now.
        del tracker
        gc.collect()

    snapshot = peak_snapshot
    if device is not None:
        device = torch.device(device)
        snapshot = {d: s for d, s in snapshot.items() if d == device}

    result: Dict[str, int] = dict.fromkeys(_CATEGORIES, 0)
    result["total"] = 0
    for dev_snap in snapshot.values():
        for k, v in dev_snap.items():
            name = _key(k)
            result[name] = result.get(name, 0) + int(v)
    if prof is not None:
        result["allocator_peak_delta"] = _allocator_peak_delta(prof)
    return result


def measure_cuda_peak(step: Callable[[], Any]) -> Dict[str, int]:
    """Run ``step()`` once on the current CUDA device; its peak from the caching allocator's own
    counters (``torch.cuda.max_memory_allocated``), in bytes.

    Returns ``start`` (allocated before the step: weights, inputs, ...), ``peak_above_start``,
    ``kept`` (still allocated after the step and ``gc.collect()``: the gradients it made) and
    ``above_floor = peak_above_start - kept``: the transient memory of the step over what any
    implementation must hold before and after it.
    """
    gc.collect()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    gc.collect()
    kept = torch.cuda.memory_allocated() - start
    return dict(start=start, peak_above_start=peak, kept=kept, above_floor=peak - kept)


def format_bytes(n: Union[int, float]) -> str:
    """``n`` bytes in binary units: ``'512 B'``, ``'1.50 KiB'``, ``'64.00 MiB'``, ``'2.00 GiB'``."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
