"""Bytes this rank sends to other ranks, counted at the ``torch.distributed`` calls the project's
context parallelism makes (tests and benchmarks)."""

import torch.distributed as dist


class SentBytes:
    """Inside it, ``bytes`` adds what leaves this rank: the whole tensor of every ``isend``, and
    ``(n - 1) / n`` of the input of every ``all_to_all_single`` over ``n`` ranks. The wrapped
    functions are ``torch.distributed``'s attributes, restored on exit."""

    def __init__(self):
        self.bytes = 0

    def __enter__(self) -> "SentBytes":
        self._isend, self._all_to_all = dist.isend, dist.all_to_all_single

        def isend(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._isend(tensor, *args, **kwargs)

        def all_to_all_single(output, input, *args, group=None, **kwargs):
            n = dist.get_world_size(group)
            self.bytes += input.numel() * input.element_size() * (n - 1) // n
            return self._all_to_all(output, input, *args, group=group, **kwargs)

        dist.isend, dist.all_to_all_single = isend, all_to_all_single
        return self

    def __exit__(self, *exc) -> None:
        dist.isend, dist.all_to_all_single = self._isend, self._all_to_all
