"""Model shapes as JSON files, turned into a megatron-core ``TransformerConfig``.

The architecture (layers, widths, heads, vocabulary, RoPE base, ...) lives in a small JSON file so
that the same training script runs a tiny CPU model and the real Llama/Mistral/Qwen2 shapes. Every
file describes a Llama-family decoder: pre-RMSNorm, SwiGLU MLP, RoPE, grouped-query attention, no
linear biases except an optional QKV bias (Qwen2). How the model is *run* (parallelism, precision,
recompute) is not in the file; it comes from the command line through :func:`transformer_config`.
"""

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from mst_megatron.training import SetupError

# key -> (type, required); ``vocab_size: null`` means "the tokenizer's vocabulary".
_KEYS = {
    "description": (str, False),
    "num_layers": (int, True),
    "hidden_size": (int, True),
    "ffn_hidden_size": (int, True),
    "num_attention_heads": (int, True),
    "num_query_groups": (int, True),
    "vocab_size": (int, True),
    "max_position_embeddings": (int, True),
    "rotary_base": (int, True),
    "norm_epsilon": (float, True),
    "share_embeddings_and_output_weights": (bool, True),
    "add_qkv_bias": (bool, True),
    "rope_scaling": (bool, False),
    "rope_scaling_factor": (float, False),
    "position_embedding_type": (str, False),
    "yarn_rotary_scaling_factor": (float, False),
    "yarn_original_max_position_embeddings": (int, False),
    "yarn_beta_fast": (float, False),
    "yarn_beta_slow": (float, False),
    "yarn_mscale": (float, False),
    "yarn_mscale_all_dim": (float, False),
    "yarn_correction_range_round_to_int": (bool, False),
}
_NULLABLE = ("vocab_size", "yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_mscale",
             "yarn_mscale_all_dim")
POSITION_EMBEDDING_TYPES = ("rope", "yarn")


@dataclass(frozen=True)
class ModelShape:
    """One model file's contents (see the module docstring for the implied architecture)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: Optional[int]
    max_position_embeddings: int
    rotary_base: int
    norm_epsilon: float
    share_embeddings_and_output_weights: bool
    add_qkv_bias: bool
    description: str = ""
    # megatron-core's Llama-3.1 frequency scaling (low/high frequency factors 1 and 4, original
    # context 8192, as megatron-core fixes them); ``rope_scaling_factor`` is used only when it is on.
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    # "yarn": megatron-core's YarnRotaryEmbedding instead of plain RoPE; the ``yarn_*`` fields are
    # megatron-core's config attributes of that name (the scaling factor and the original context are
    # required; ``yarn_mscale``/``yarn_mscale_all_dim`` None: attention factor 0.1 ln(factor) + 1).
    position_embedding_type: str = "rope"
    yarn_rotary_scaling_factor: Optional[float] = None
    yarn_original_max_position_embeddings: Optional[int] = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: Optional[float] = None
    yarn_mscale_all_dim: Optional[float] = None
    yarn_correction_range_round_to_int: bool = True

    def replace(self, **changes) -> "ModelShape":
        """A copy with some fields changed (command-line overrides), validated again."""
        fields = {**self.__dict__, **{k: v for k, v in changes.items() if v is not None}}
        return _validated(fields, "overrides")

    def parameter_count(self, vocab_size: int) -> int:
        """Parameters of the whole model (all ranks together) with a ``vocab_size`` embedding."""
        h, head_dim = self.hidden_size, self.hidden_size // self.num_attention_heads
        qkv_out = h + 2 * self.num_query_groups * head_dim
        layer = h * qkv_out + h * h + 3 * h * self.ffn_hidden_size + 2 * h
        layer += qkv_out if self.add_qkv_bias else 0
        embeddings = vocab_size * h * (1 if self.share_embeddings_and_output_weights else 2)
        return self.num_layers * layer + embeddings + h

    def architecture(self) -> dict:
        """The fields that fix parameter shapes: what a checkpoint must match (RoPE base, norm
        epsilon and max positions may change between runs, e.g. to extend the context)."""
        return {k: getattr(self, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                              "num_query_groups", "vocab_size", "share_embeddings_and_output_weights",
                                              "add_qkv_bias")}

    def rope_settings(self) -> dict:
        """The rotary-embedding fields in effect (the scaling fields only when their scaling is on)."""
        out = dict(rotary_base=self.rotary_base, position_embedding_type=self.position_embedding_type,
                   rope_scaling=self.rope_scaling, **self.yarn_config())
        if self.rope_scaling:
            out["rope_scaling_factor"] = self.rope_scaling_factor
        return out

    def yarn_config(self) -> dict:
        """The ``yarn_*`` TransformerConfig attributes megatron-core's YaRN reads ({} without YaRN)."""
        if self.position_embedding_type != "yarn":
            return {}
        return {k: v for k, v in self.__dict__.items() if k.startswith("yarn_")}


def _validated(raw: dict, source: str) -> ModelShape:
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise SetupError(f"{source}: unknown model config keys {unknown}; allowed: {sorted(_KEYS)}")
    for key, (kind, required) in _KEYS.items():
        if key not in raw:
            if required:
                raise SetupError(f"{source}: model config key {key!r} is missing")
            continue
        value = raw[key]
        if key in _NULLABLE and value is None:
            continue
        allowed = (int, float) if kind is float else kind
        if not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool)):
            raise SetupError(f"{source}: model config {key!r} must be {kind.__name__}, got {value!r}")
        if kind in (int, float) and not value > 0:
            raise SetupError(f"{source}: model config {key!r} must be > 0, got {value!r}")
    shape = ModelShape(**raw)
    _check_rope(shape, source)
    if shape.num_attention_heads % shape.num_query_groups:
        raise SetupError(
            f"{source}: num_attention_heads ({shape.num_attention_heads}) must be a multiple of "
            f"num_query_groups ({shape.num_query_groups})"
        )
    if shape.hidden_size % shape.num_attention_heads:
        raise SetupError(
            f"{source}: hidden_size ({shape.hidden_size}) must be a multiple of "
            f"num_attention_heads ({shape.num_attention_heads})"
        )
    return shape


def _check_rope(shape: ModelShape, source: str) -> None:
    kind = shape.position_embedding_type
    if kind not in POSITION_EMBEDDING_TYPES:
        raise SetupError(f"{source}: position_embedding_type {kind!r} is not supported; allowed: "
                         f"{list(POSITION_EMBEDDING_TYPES)}")
    defaults = ModelShape.__dataclass_fields__
    if kind == "yarn":
        missing = [k for k in ("yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings")
                   if getattr(shape, k) is None]
        if missing:
            raise SetupError(f"{source}: position_embedding_type 'yarn' needs {missing}")
        if shape.rope_scaling:
            raise SetupError(f"{source}: rope_scaling (Llama-3.1 scaling) and position_embedding_type 'yarn' "
                             "exclude each other; pick one")
        if (shape.yarn_mscale is None) != (shape.yarn_mscale_all_dim is None):
            raise SetupError(f"{source}: yarn_mscale and yarn_mscale_all_dim are used together (the attention "
                             "factor is their ratio) or both null (0.1 ln(factor) + 1); got "
                             f"{shape.yarn_mscale} and {shape.yarn_mscale_all_dim}")
        if (shape.yarn_mscale is None) != (shape.yarn_mscale_all_dim is None):
            raise SetupError(f"{source}: yarn_mscale and yarn_mscale_all_dim are used together (their ratio is the "
                             "attention factor) or not at all; give both or neither")
    else:
        set_here = sorted(k for k in defaults if k.startswith("yarn_") and getattr(shape, k) != defaults[k].default)
        if set_here:
            raise SetupError(f"{source}: {set_here} apply only with position_embedding_type 'yarn', "
                             f"not {kind!r}")


def load_model_shape(name_or_path: str, search_dir: Optional[str] = None) -> ModelShape:
    """Read a model JSON file: a path, or a bare name looked up as ``<search_dir>/<name>.json``."""
    path = name_or_path
    if not os.path.isfile(path) and search_dir is not None:
        path = os.path.join(search_dir, f"{name_or_path}.json")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(search_dir) if f.endswith(".json")) if search_dir else []
        raise SetupError(f"--model-config {name_or_path!r}: no such file; known names: {known}")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise SetupError(f"--model-config {path}: not valid JSON ({e})") from None
    return _validated(raw, path)


def transformer_config(shape: ModelShape, **run_options):
    """``TransformerConfig`` for ``shape``; ``run_options`` are TransformerConfig fields that say how
    it runs (parallel sizes, ``sequence_parallel``, ``bf16``, recompute settings, dropout, ...).

    Fused kernels are off (see :func:`mst_megatron.specs.llama_config.llama_transformer_config`).
    """
    from mst_megatron.specs.llama_config import llama_transformer_config

    bf16 = run_options.get("bf16", False)
    kwargs = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        layernorm_epsilon=shape.norm_epsilon,
        add_qkv_bias=shape.add_qkv_bias,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        **shape.yarn_config(),
    )
    kwargs.update(run_options)
    try:
        return llama_transformer_config(**kwargs)
    except (AssertionError, ValueError) as e:
        raise SetupError(f"the model config and run options do not fit together: {e}") from None
