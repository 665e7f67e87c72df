"""Saved tensors kept in host memory between forward and backward (pure torch): for the layer inputs
that full recompute keeps, the memory floor MST leaves (docs/design.md#layer-input-offload)."""

import collections
import contextlib
from typing import Dict, List, Tuple

import torch

__all__ = ["HostOffload"]

HOST_DEVICE = "cpu"  # where offloaded tensors live; the simulator points it at "meta" (host counted apart)


class _Saved:
    """One offloaded tensor: its host copy and, once fetched back, its device copy."""

    __slots__ = ("host", "source", "device", "ready", "group", "index", "pending")

    def __init__(self, host, source, group, index):
        self.host, self.source, self.group, self.index = host, source, group, index
        self.device = self.ready = None
        self.pending = None  # the device tensor, kept alive until its copy to host is done


class HostOffload:
    """Saved-tensor hooks that move what autograd saves inside :meth:`scope` to host memory.

    Each tensor saved for backward inside a scope that is an activation (floating point, requires
    grad: not a constant such as rotary tables, which several layers share) and at least ``min_bytes``
    large is copied to a host buffer when saved (the device tensor is then free once the copy is
    done) and copied back when backward unpacks it; unpacking the ``i``-th tensor of a scope starts
    fetching the ``i-1``-th, the one backward needs next. Other saved tensors stay as they are.

    Device ``cuda`` (host :data:`HOST_DEVICE` ``"cpu"``): pinned host buffers reused across steps,
    copies on one side stream ordered by events, at most ``max_in_flight`` copies to host pending
    (the oldest is waited for). Any other pair of devices: plain synchronous copies, so that the
    bookkeeping runs, and is tested, on a CPU. Values are copied exactly: backward is bit-identical.
    Each saved tensor may be unpacked once (no ``retain_graph``).

    Args:
        min_bytes: smallest tensor moved (default 1 MiB: layer inputs, not norms' statistics).
        max_in_flight: copies to host allowed to be pending at once (CUDA); >= 1.
    """

    def __init__(self, min_bytes: int = 1 << 20, max_in_flight: int = 2):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {min_bytes}")
        self.min_bytes, self.max_in_flight = min_bytes, max_in_flight
        self._pool: Dict[Tuple, List[torch.Tensor]] = collections.defaultdict(list)  # free host buffers
        self._to_host: collections.deque = collections.deque()  # (event, _Saved) pending on CUDA
        self._stream = None
        self.host_bytes = 0  # bytes held in host memory now
        self.peak_host_bytes = 0

    @contextlib.contextmanager
    def scope(self):
        """Offload what autograd saves inside; each scope is one chain for prefetching in backward."""
        group: List[_Saved] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(t, group), self._unpack):
            yield

    @staticmethod
    def pause():
        """Inside a scope: keep what is saved here on the device (identity hooks on top of the scope's)."""
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)

    def _cuda(self, t: torch.Tensor) -> bool:
        return t.device.type == "cuda" and HOST_DEVICE == "cpu"

    def _side_stream(self):
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def _host_buffer(self, t: torch.Tensor) -> torch.Tensor:
        free = self._pool[(tuple(t.shape), t.dtype)]
        if free:
            return free.pop()
        return torch.empty(t.shape, dtype=t.dtype, device=HOST_DEVICE, pin_memory=self._cuda(t))

    def _pack(self, t: torch.Tensor, group: List[_Saved]):
        if not (t.is_floating_point() and t.requires_grad) or t.numel() * t.element_size() < self.min_bytes:
            return t
        host = self._host_buffer(t)
        saved = _Saved(host, t.device, group, len(group))
        group.append(saved)
        nbytes = host.numel() * host.element_size()
        self.host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        if not self._cuda(t):
            host.copy_(t.detach())
            return saved
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            host.copy_(t.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        saved.pending = t
        self._to_host.append((done, saved))
        while len(self._to_host) > self.max_in_flight:
            event, oldest = self._to_host.popleft()
            event.synchronize()
            oldest.pending = None
        return saved

    def _fetch(self, saved: _Saved, device: torch.device) -> None:
        """Start copying ``saved`` back to ``device`` (no-op if under way or done)."""
        if saved.device is not None or saved.host is None:
            return
        if device.type != "cuda" or HOST_DEVICE != "cpu":
            saved.device = saved.host.to(device, copy=True)
            return
        stream = self._side_stream()
        with torch.cuda.stream(stream):
            saved.device = saved.host.to(device, non_blocking=True)
            saved.ready = torch.cuda.Event()
            saved.ready.record(stream)

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        if saved.host is None:
            raise RuntimeError("HostOffload: a saved tensor was unpacked twice (retain_graph / double "
                               "backward is not supported with offloaded tensors)")
        self._fetch(saved, saved.source)
        if saved.index > 0:  # backward needs the one saved before it next
            self._fetch(saved.group[saved.index - 1], saved.source)
        out = saved.device
        if saved.ready is not None:
            current = torch.cuda.current_stream(saved.source)
            current.wait_event(saved.ready)
            out.record_stream(current)
        self._release(saved)
        return out

    def _release(self, saved: _Saved) -> None:
        """The host buffer goes back to the pool (later copies into it are ordered after this one's)."""
        host = saved.host
        self._pool[(tuple(host.shape), host.dtype)].append(host)
        self.host_bytes -= host.numel() * host.element_size()
        saved.host = saved.device = saved.ready = saved.pending = None

