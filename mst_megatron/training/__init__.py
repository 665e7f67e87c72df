"""Pretraining a GPT with MST on megatron-core: the reusable pieces behind ``examples/pretrain_gpt_mst.py``.

- :mod:`.model_config`: model shapes from JSON files -> ``TransformerConfig``
- :mod:`.arguments`: Megatron-LM-named command-line flags, checked before any work starts
- :mod:`.corpus`: raw-text documents for ``scripts/train_tokenizer.py`` and ``scripts/preprocess_data.py``
- :mod:`.data`: tokenizer, indexed-dataset blends and their checks, resumable batch order
- :mod:`.checkpointing`: ``dist_checkpointing`` save/resume in Megatron-LM's directory layout
- :mod:`.monitor`: per-step log lines, progress bar, TensorBoard
- :mod:`.pretrain`: model provider, optimizer, scheduler and the train/eval loop
"""

import sys
from typing import Callable


class SetupError(ValueError):
    """Bad input found before any work starts; the CLI prints it as one line and exits 2."""


def run_cli(prog: str, work: Callable[[], str]) -> int:
    """``work()``, its returned line printed, exit code 0; a :class:`SetupError` printed as one line
    ``prog: error: ...`` on stderr, exit code 2."""
    try:
        line = work()
    except SetupError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(line)
    return 0


class RunError(RuntimeError):
    """A failure found during work (an unreadable checkpoint file, a full disk): the CLI prints it as
    one line and exits 1. Raised on every rank; only the one with ``report`` set prints it."""

    def __init__(self, message: str, report: bool = True):
        super().__init__(message)
        self.report = report
