"""Mini-sequence bookkeeping shared by every chunked op.

Chunk counts must be identical on every rank that joins a collective inside a chunk, so they are
always derived from global shapes, and every token lands in exactly one chunk (no ``S // M`` tail
drop).
"""

import math
from typing import List, Union

AUTO = "auto"
ChunkCount = Union[int, str]


def validate_chunk_count(value: ChunkCount, name: str) -> ChunkCount:
    """Return ``value`` if it is an int >= 1 or ``"auto"``; raise naming ``name`` otherwise."""
    if value == AUTO:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1 or 'auto', got {value!r}")
    return value


def resolve_chunk_count(value: ChunkCount, name: str, length: int, auto_tokens_per_chunk: int) -> int:
    """Number of mini-sequences for a sequence of ``length`` tokens.

    ``"auto"`` gives chunks of about ``auto_tokens_per_chunk`` tokens. An explicit count larger than
    ``length`` is clamped to ``length`` (one token per chunk), never rounded away.
    """
    value = validate_chunk_count(value, name)
    if length < 1:
        raise ValueError(f"{name}: cannot split a sequence of length {length}")
    if value == AUTO:
        value = math.ceil(length / max(1, auto_tokens_per_chunk))
    return min(value, length)


def local_chunk_count(value: ChunkCount, name: str, local_length: int, sp_size: int, auto_tokens_per_chunk: int) -> int:
    """Chunks of a rank's ``local_length`` tokens when each chunk is all-gathered from the ``sp_size``
    ranks of a sequence-parallel group (1: no gather): ``"auto"`` gives gathered chunks of about
    ``auto_tokens_per_chunk`` tokens, and the count is clamped to ``local_length``. The lengths are
    equal on every rank of the group, so is the count."""
    count = resolve_chunk_count(value, name, local_length * sp_size, auto_tokens_per_chunk)
    return min(count, local_length)


def chunk_sizes(length: int, num_chunks: int) -> List[int]:
    """Sizes of ``num_chunks`` near-equal chunks covering ``length`` (the first ones one larger)."""
    if not 1 <= num_chunks <= length:
        raise ValueError(f"num_chunks must be in [1, {length}] for length {length}, got {num_chunks}")
    base, extra = divmod(length, num_chunks)
    return [base + 1] * extra + [base] * (num_chunks - extra)
