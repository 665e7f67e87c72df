"""Training data: megatron-core indexed-dataset blends checked against the tokenizer, resumable batch order.

Checks that fail before any work starts (missing files, ids outside the tokenizer's vocabulary, empty
splits), and a batch order that is a pure function of the samples consumed, so a resumed run reads
the batches an uninterrupted run would have read.
"""

import math
import os
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from mst_megatron.training import SetupError

# Read at most this many tokens per dataset when bounding its largest token id.
MAX_SCANNED_TOKENS = 1 << 26
_SCAN_WINDOW = 1 << 20


def check_dataset_helpers() -> None:
    """megatron-core builds sample indices with a compiled extension (``datasets/helpers_cpp``).

    megatron-core 0.16.1's wheels ship it compiled; a source install compiles it at install time
    (with pybind11 and a C++ compiler). If neither happened, say how to build it instead of failing
    deep inside the first dataset build.
    """
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as e:
        import sysconfig

        import megatron.core.datasets as datasets

        folder = os.path.dirname(datasets.__file__)
        target = os.path.join(folder, "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
        raise SetupError(
            f"megatron-core's compiled dataset helpers are missing ({e}); build them with: pip install "
            f"pybind11 && g++ -O3 -shared -std=c++17 -fPIC $(python -m pybind11 --includes) "
            f"{folder}/helpers.cpp -o {target}"
        ) from None


def parse_data_path(data_path: List[str]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron-LM's ``--data-path``: ``p1 p2 ...`` or ``w1 p1 w2 p2 ...`` -> (prefixes, weights)."""
    from megatron.core.datasets.utils import get_blend_from_list

    if not data_path:
        raise SetupError("--data-path is required: one or more dataset prefixes (PATH for PATH.bin/PATH.idx)")
    prefixes, weights = get_blend_from_list(list(data_path))
    if weights is not None and any(w <= 0 for w in weights):
        raise SetupError(f"--data-path weights must be > 0, got {weights}")
    return prefixes, weights


def _missing_files(prefix: str) -> List[str]:
    return [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]


def max_token_id(prefix: str, dtype) -> int:
    """The largest token id in ``prefix.bin`` (of ``dtype``), or a lower bound of it for huge files.

    Files up to :data:`MAX_SCANNED_TOKENS` tokens are read whole; larger ones in evenly spaced
    windows of that total size, so the check stays cheap while a wrong tokenizer (whose ids are
    spread over the whole file) is still caught.
    """
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
    if tokens.size <= MAX_SCANNED_TOKENS:
        return int(tokens.max())
    starts = np.linspace(0, tokens.size - _SCAN_WINDOW, MAX_SCANNED_TOKENS // _SCAN_WINDOW).astype(np.int64)
    return max(int(tokens[s : s + _SCAN_WINDOW].max()) for s in starts)


def _split_bounds(split: str) -> list:
    """megatron-core's [begin, end) share of each split, after checking the ``--split`` string."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            shares = parse_and_normalize_split(split)
    except AssertionError:  # more than three shares
        shares = []
    if len(shares) != 3 or not all(math.isfinite(x) for x in shares) or shares[0] <= 0:
        raise SetupError(f"--split {split!r}: expected 'train,valid,test' shares (>= 0) with train > 0")
    return convert_split_vector_to_split_matrix(shares)


def check_data(prefixes: List[str], vocab_size: int, split: str, tokenizer: str) -> None:
    """Every prefix has its ``.bin``/``.idx``, only ids below the tokenizer's ``vocab_size``, and at
    least one document in every split with a share (megatron-core waits forever on an empty one).
    ``tokenizer`` names the tokenizer in the error (its type and file)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        missing = _missing_files(prefix)
        if missing:
            raise SetupError(f"--data-path {prefix}: missing {', '.join(missing)}")
    bounds = _split_bounds(split)
    for prefix in prefixes:
        index = IndexedDataset(prefix).index
        num_docs = len(index.sequence_lengths)
        if num_docs == 0:
            raise SetupError(f"--data-path {prefix}: the dataset holds no documents")
        for name, share in zip(("train", "valid", "test"), bounds):
            if share is not None and round(share[0] * num_docs) == round(share[1] * num_docs):
                raise SetupError(
                    f"--split {split}: the {name} share of --data-path {prefix} ({num_docs} documents) "
                    f"holds no document; give {name} a larger share, or 0"
                )
        largest = max_token_id(prefix, index.dtype)
        if largest >= vocab_size:
            raise SetupError(
                f"--data-path {prefix} holds token id {largest}, but --tokenizer-model has "
                f"{vocab_size} tokens ({tokenizer}): the data was tokenized with another tokenizer"
            )


def check_cache(prefixes: List[str], cache_path: Optional[str]) -> None:
    """megatron-core's sample-index cache can be written: ``--data-cache-path`` (checked with the
    flags), else ``<prefix>/cache/GPTDataset_indices``, which must exist (a cache built before) or be
    creatable."""
    if cache_path is not None:
        return
    for prefix in prefixes:
        folder = os.path.join(prefix, "cache", "GPTDataset_indices")
        existing = folder
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if existing != folder and not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
            raise SetupError(
                f"--data-path {prefix}: megatron-core caches its sample index in {folder}, which cannot be "
                f"created ({existing} is not writable); pass --data-cache-path with a writable folder"
            )


def build_datasets(
    tokenizer,
    blend: Tuple[List[str], Optional[List[float]]],
    split: str,
    seq_length: int,
    seed: int,
    num_train_samples: int,
    num_valid_samples: int,
    cache_dir: Optional[str] = None,
):
    """(train, valid) megatron-core ``GPTDataset`` blends; call on every rank after ``init_parallel``.

    Rank 0 builds the shuffled sample index and caches it (next to the data unless ``cache_dir``);
    the other ranks load that cache. ``valid`` is None when the split gives validation no share.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the causal mask is built inside attention
    )
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train_samples, num_valid_samples, 0], lambda: True, config
    )
    train, valid, _ = builder.build()
    if train is None or len(train) == 0:
        raise SetupError(f"--split {split!r} leaves no training samples of --seq-length {seq_length}")
    return train, valid


def _collate(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask", "position_ids")}


def micro_batches(
    dataset, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int, data_parallel_size: int
) -> Iterator[Dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches, in global order, from sample ``consumed_samples`` on.

    Sample ``i`` of the run is ``dataset[i % len(dataset)]``; each step of ``micro_batch_size *
    data_parallel_size`` samples gives every rank its own contiguous slice (Megatron-LM's order).
    """
    step = micro_batch_size * data_parallel_size
    start = consumed_samples + data_parallel_rank * micro_batch_size
    while True:
        yield _collate([dataset[i % len(dataset)] for i in range(start, start + micro_batch_size)])
        start += step
