"""Peak-memory measurement for benchmarks, on CPU or GPU, around ``torch``'s ``MemTracker``.

``MemTracker`` is a ``TorchDispatchMode``: it sees every tensor an ATen op returns inside the context,
follows each storage with a weak reference until it is freed, and records the per-device total (and
its breakdown by category) at its highest point. Tensors that exist before the step are counted only
if passed to ``track_external`` (here: ``modules_or_tensors`` and ``optimizer``).

What it sees and how it labels it (checked in ``tests/test_ops_mini_sequence.py`` against the CPU
allocator's own record from ``torch.profiler``):

* Categories are assigned when a storage is first seen: ``ACT`` for anything created outside autograd's
  backward, ``TEMP`` for anything created inside it (activation gradients, recomputed activations of a
  checkpointed function that is not an ``nn.Module`` call, and weight gradients until they are
  accumulated), ``GRAD`` once a parameter's gradient has been accumulated (grad hooks are installed on
  modules that run inside the step), ``OPT`` inside ``optimizer.step``, ``OTH`` for external tensors.
  An input's ``.grad`` stays ``TEMP`` (only parameters get ``GRAD``). Recomputed activations count as
  ``ACT`` only when the recompute runs an ``nn.Module``'s forward. The ``total`` does not depend on
  the labels.
* The breakdown returned is the snapshot at the moment the total peaked (it sums to ``total``), not the
  per-category maxima.
* Memory that bypasses the dispatcher (kernel workspaces, allocator rounding and caching, CUDA
  context) is not seen; ``allocator=True`` adds the allocator-level figure from ``torch.profiler`` as
  a cross-check.
* The allocator figure counts frees as well as allocations, so memory that existed before the step
  and is freed during it lowers it; :func:`measure_peak` runs ``gc.collect()`` before the step so
  that leftover garbage is not freed mid-step. The tracker itself leaves reference cycles (its hooks
  and autograd nodes) that keep some tensors alive until the next collection; ``gc.collect()`` runs
  after the step too. Running the step under the tracker does not change the allocator's peak (seen
  for the SwiGLU test: the same bytes with and without it).
* Stock ``MemTracker`` raises ``NotImplementedError`` when a module is called twice at top level in one
  context (it takes that for a second iteration). A mini-sequence op calls its function once per chunk,
  so :func:`measure_peak` uses a subclass that accepts repeated calls (those calls' per-module snapshots
  are skipped; the global peak is unaffected). The subclass also accepts megatron's DDP wrapper, whose
  ``buffers`` attribute is a list (its gradient buffers) rather than ``Module.buffers()``.
"""

import gc
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
from torch.distributed._tools.mem_tracker import MemTracker

__all__ = ["measure_peak", "measure_cuda_peak", "format_bytes"]

_TOTAL_KEY = "Total"
_CATEGORIES = ("PARAM", "BUFFER", "GRAD", "ACT", "TEMP", "OPT", "OTH")


class _StepMemTracker(MemTracker):
    """``MemTracker`` that tolerates a module being called more than once at top level."""

    def _pre_fw_hook(self, module, inputs):
        try:
            super()._pre_fw_hook(module, inputs)
        except NotImplementedError:
            # Raised only for a second top-level forward of an already-seen module; its parameters and
            # grad hooks were set up on the first call, and dispatch-level tracking is unaffected.
            pass

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        # megatron's DistributedDataParallel shadows Module.buffers() with its list of gradient
        # buffers; its parameters and buffers are those of the module it wraps.
        if not callable(module.buffers):
            module = module.module
        return super()._track_module_params_and_buffers(module, install_grad_hooks)


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
    tracker = _StepMemTracker()
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
