"""Import megatron-core without its warnings about optional GPU extras.

megatron-core warns at import time that Transformer Engine and Apex are missing and that it falls
back to torch implementations. Those extras are optional here, so the fallback is the expected
configuration, not something to warn about.
"""

import warnings

_OPTIONAL_EXTRAS = r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*"


def import_megatron_quietly() -> None:
    """Import the megatron-core modules this package uses, silencing only the extras warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_OPTIONAL_EXTRAS, category=UserWarning)
        import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
        import megatron.core.optimizer  # noqa: F401
        import megatron.core.models.gpt  # noqa: F401
