"""Import megatron-core without its notices about optional extras.

megatron-core warns at import time that Transformer Engine and Apex are missing (it falls back to
torch implementations) and, from 0.19, that absl.logging is missing (it falls back to ``logging``);
a CUDA build of torch on a machine without a CUDA runtime logs that it found none while megatron
imports ``torch.utils.cpp_extension``. Those extras are optional here, so the fallbacks are the
expected configuration, not something to warn about.
"""

import logging
import warnings

_OPTIONAL_EXTRAS = r".*((Transformer Engine|Apex) (and Apex )?(is|are) not installed|absl\.logging is not installed).*"


def import_megatron_quietly() -> None:
    """Import the megatron-core modules this package uses, silencing only the optional-extras notices."""
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension_log.level
    cpp_extension_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_OPTIONAL_EXTRAS, category=UserWarning)
            import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
            import megatron.core.optimizer  # noqa: F401
            import megatron.core.models.gpt  # noqa: F401
    finally:
        cpp_extension_log.setLevel(level)
