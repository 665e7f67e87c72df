"""Mini-Sequence Transformers (MST) for NVIDIA megatron-core.

``import mst_megatron`` imports only torch; megatron-core is imported on first use of a name that
needs it, so the package imports silently on machines without Transformer Engine or Apex.
"""

import importlib

from mst_megatron.runtime.parallel import destroy_parallel, init_parallel

# public name -> module that defines it (imported lazily: these pull in megatron-core)
_LAZY = {
    "MiniSequenceMLP": "mst_megatron.modules.mlp",
    "get_gpt_mst_layer_spec": "mst_megatron.specs.gpt_layer_specs",
    "get_gpt_mst_block_spec": "mst_megatron.specs.gpt_layer_specs",
    "MSTGPTModel": "mst_megatron.modules.gpt_model",
}

__all__ = ["init_parallel", "destroy_parallel", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'mst_megatron' has no attribute {name!r}")
    from mst_megatron.runtime.quiet import import_megatron_quietly

    import_megatron_quietly()
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
