"""Chunk counts and sizes shared by every chunked op (invariants: docs/design.md#chunking)."""

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
    """Chunks of a ``length``-token sequence: ``"auto"`` gives about ``auto_tokens_per_chunk`` tokens
    each; any count is clamped to ``length``. Raises ``ValueError`` naming ``name``."""
    value = validate_chunk_count(value, name)
    if length < 1:
        raise ValueError(f"{name}: cannot split a sequence of length {length}")
    if value == AUTO:
        value = math.ceil(length / max(1, auto_tokens_per_chunk))
    return min(value, length)


def local_chunk_count(value: ChunkCount, name: str, local_length: int, sp_size: int, auto_tokens_per_chunk: int) -> int:
    """Chunks of ``local_length`` tokens each all-gathered from ``sp_size`` ranks (1: no gather):
    ``"auto"`` sizes the gathered chunk; clamped to ``local_length``."""
    count = resolve_chunk_count(value, name, local_length * sp_size, auto_tokens_per_chunk)
    return min(count, local_length)


def chunk_sizes(length: int, num_chunks: int) -> List[int]:
    """Sizes of ``num_chunks`` near-equal chunks covering ``length`` (the first ones one larger)."""
    if not 1 <= num_chunks <= length:
        raise ValueError(f"num_chunks must be in [1, {length}] for length {length}, got {num_chunks}")
    base, extra = divmod(length, num_chunks)
    return [base + 1] * extra + [base] * (num_chunks - extra)
