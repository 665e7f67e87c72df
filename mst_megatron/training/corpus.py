"""Raw-text documents from files and folders, shared by ``scripts/train_tokenizer.py`` and
``scripts/preprocess_data.py`` so both read exactly the same documents in the same order, and their
tokenization in worker processes.

A ``.jsonl`` file holds one JSON object per line with the text under ``json_key`` (Megatron-LM's
preprocessing format); any other file is one document; a folder contributes its files that match
``pattern``, recursively, in sorted order.
"""

import argparse
import fnmatch
import itertools
import json
import os
from typing import Iterable, Iterator, List, Sequence

BATCH_DOCUMENTS = 256  # documents per task of a tokenizer worker
_worker_tokenizer = None  # the pool's tokenizer: set before the workers fork, so each inherits it


def _files(path: str, pattern: str, exclude_dirs: Sequence[str]) -> Iterator[str]:
    if os.path.isfile(path):
        yield path
        return
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in exclude_dirs and not d.startswith((".", "__")))
        for name in sorted(names):
            if fnmatch.fnmatch(name, pattern):
                yield os.path.join(root, name)


def _read(path: str, json_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        if not path.endswith(".jsonl"):
            yield f.read()
            return
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if json_key not in record:
                raise KeyError(f"{path}:{line_no}: no {json_key!r} key (set --json-key)")
            yield record[json_key]


def documents(
    inputs: Iterable[str], pattern: str = "*", exclude_dirs: Sequence[str] = (), json_key: str = "text",
    max_bytes: int = 0,
) -> Iterator[str]:
    """Non-empty documents from ``inputs``; stops after ``max_bytes`` of UTF-8 text (0: no limit)."""
    total = 0
    for path in inputs:
        for file in _files(path, pattern, exclude_dirs):
            for text in _read(file, json_key):
                if not text.strip():
                    continue
                yield text
                total += len(text.encode("utf-8"))
                if max_bytes and total >= max_bytes:
                    return


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--input`` family of flags, identical in both tools."""
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="text files (one document each), .jsonl files, or folders")
    parser.add_argument("--json-key", default="text", help="text key of .jsonl records (default: text)")
    parser.add_argument("--pattern", default="*", help="file-name pattern inside folders (default: *)")
    parser.add_argument("--exclude-dir", action="append", default=[], metavar="NAME",
                        help="skip sub-folders with this name (repeatable)")
    parser.add_argument("--max-bytes", type=int, default=0,
                        help="stop after this many bytes of text (default 0: read everything)")


def documents_from_args(args: argparse.Namespace) -> Iterator[str]:
    """:func:`documents` for the flags added by :func:`add_input_arguments`."""
    return documents(args.input, args.pattern, args.exclude_dir, args.json_key, args.max_bytes)


def _tokenize(batch: List[str]) -> List[List[int]]:
    return [_worker_tokenizer.tokenize(doc) for doc in batch]


def _batches(docs: Iterable[str], size: int) -> Iterator[List[str]]:
    docs = iter(docs)
    while True:
        batch = list(itertools.islice(docs, size))
        if not batch:
            return
        yield batch


def tokenized(tokenizer, docs: Iterable[str], workers: int) -> Iterator[List[int]]:
    """``tokenizer.tokenize(doc)`` for every document, in order; ``workers`` > 1 forked processes share
    the work in batches of :data:`BATCH_DOCUMENTS`, a few batches each at a time (the corpus is
    streamed, never read whole)."""
    global _worker_tokenizer
    if workers <= 1:
        yield from map(tokenizer.tokenize, docs)
        return
    import multiprocessing

    _worker_tokenizer = tokenizer
    windows = _batches(_batches(docs, BATCH_DOCUMENTS), 4 * workers)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for window in windows:
            for batch in pool.imap(_tokenize, window):
                yield from batch
