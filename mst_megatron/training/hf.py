"""Hugging Face Llama / Mistral / Qwen2 checkpoints in and out of megatron-core.

:func:`import_hf` turns a Hugging Face folder (``config.json`` + ``*.safetensors``) into a
checkpoint root that ``examples/pretrain_gpt_mst.py --load ROOT --model-config ROOT/model_config.json``
trains from, at any tensor / pipeline layout, MST or stock model. :func:`export_hf` writes any
iteration of such a root (imported or trained) back as a Hugging Face folder.

A checkpoint root made here holds:

- ``iter_0000000/``: a weights-only megatron-core distributed checkpoint (see
  :func:`mst_megatron.training.checkpointing.save_weights`), tensors in the HF files' dtype;
- ``model_config.json``: the model shape for ``--model-config`` (RMSNorm eps, rotary base and
  scaling, tied embeddings, QKV bias, unpadded vocabulary);
- ``hf/``: the HF folder's ``config.json`` and tokenizer files, copied for the export and for
  ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model ROOT/hf``.

Tensor mapping (megatron-core's local-spec names; MST keeps them), ``d`` the head size, ``G`` the
key/value groups, ``n = heads / G``:

- ``q_proj [G*n*d, h]``, ``k_proj``, ``v_proj [G*d, h]`` -> ``linear_qkv [G*(n+2)*d, h]``, grouped:
  for each group its ``n`` query heads, then its key head, then its value head (biases alike);
- ``gate_proj``, ``up_proj`` -> ``linear_fc1 = [gate; up]``; ``down_proj`` -> ``linear_fc2``;
- ``o_proj`` -> ``linear_proj``; ``input_layernorm`` / ``post_attention_layernorm`` ->
  ``input_layernorm`` / ``pre_mlp_layernorm``; ``model.norm`` -> ``decoder.final_layernorm``;
- ``embed_tokens`` -> ``embedding.word_embeddings``; ``lm_head`` -> ``output_layer`` (absent when tied).
"""

import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

import torch

from mst_megatron.training import SetupError
from mst_megatron.training.model_config import ModelShape, _validated

# config.json "architectures" entry -> whether its attention has q/k/v biases.
ARCHITECTURES = {"LlamaForCausalLM": None, "MistralForCausalLM": False, "Qwen2ForCausalLM": True}
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# HF rope_type yarn keys (``type`` is the transformers-4 name of ``rope_type``; a transformers-5
# ``rope_parameters`` dict also holds ``rope_theta``, read apart).
_YARN_KEYS = ("rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
              "mscale", "mscale_all_dim", "truncate", "attention_factor")
_HF_FILES_KEPT = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
HF_FOLDER = "hf"
MODEL_CONFIG = "model_config.json"


def _rope(cfg: dict, source: str):
    """(theta, scaling dict or None) from a transformers-4 (``rope_theta``/``rope_scaling``) or
    transformers-5 (``rope_parameters``) config, as transformers reads it: a scaling dict's
    ``original_max_position_embeddings`` is the config's top-level one if there is one, else the
    dict's, else ``max_position_embeddings``. Partial rotary embeddings are refused."""
    params = cfg.get("rope_parameters")
    if params is not None:
        theta, scaling = params.get("rope_theta", 10000.0), {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta, scaling = cfg.get("rope_theta", 10000.0), dict(cfg.get("rope_scaling") or {})
    partial = scaling.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise SetupError(f"{source}: partial_rotary_factor {partial} is not supported (megatron-core's GPT rotates "
                         "the whole head here); only 1.0")
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return theta, None
    if "original_max_position_embeddings" in cfg:
        scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return theta, scaling


def _yarn_shape_fields(scaling: dict, source: str) -> dict:
    """The ``yarn_*`` shape fields of an HF ``rope_type: yarn`` dict, where HF's
    ``_compute_yarn_parameters`` and megatron-core's ``YarnRotaryEmbedding`` compute the same
    frequencies and cos/sin scale (docs/design.md, "RoPE settings from Hugging Face"); refused otherwise."""
    unknown = sorted(set(scaling) - set(_YARN_KEYS))
    if unknown:
        raise SetupError(f"{source}: rope scaling yarn field(s) {unknown} are not supported; known: {sorted(_YARN_KEYS)}")
    factor, original = scaling.get("factor"), scaling.get("original_max_position_embeddings")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor >= 1:
        raise SetupError(f"{source}: rope scaling yarn needs factor, a number >= 1 (megatron-core's "
                         f"yarn_rotary_scaling_factor), got {factor!r}")
    if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
        raise SetupError(f"{source}: rope scaling yarn needs original_max_position_embeddings, an int > 0, got {original!r}")
    # HF takes the mscale ratio only when both are non-zero (and treats 0 / None betas as 32 / 1);
    # megatron-core takes it whenever both are given: pass both only where HF uses them.
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    ratio = bool(mscale) and bool(mscale_all_dim)
    fields = dict(position_embedding_type="yarn", yarn_rotary_scaling_factor=float(factor),
                  yarn_original_max_position_embeddings=original,
                  yarn_beta_fast=float(scaling.get("beta_fast") or 32), yarn_beta_slow=float(scaling.get("beta_slow") or 1),
                  yarn_mscale=float(mscale) if ratio else None, yarn_mscale_all_dim=float(mscale_all_dim) if ratio else None,
                  yarn_correction_range_round_to_int=bool(scaling.get("truncate", True)))
    attention_factor = scaling.get("attention_factor")
    if attention_factor is not None:
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor

        derived = _yarn_get_concentration_factor(fields["yarn_rotary_scaling_factor"], fields["yarn_mscale"],
                                                 fields["yarn_mscale_all_dim"])
        if attention_factor != derived:
            raise SetupError(f"{source}: rope scaling yarn attention_factor {attention_factor} is not supported: "
                             "megatron-core derives the cos/sin scale from factor, mscale and mscale_all_dim "
                             f"({derived} here); remove attention_factor or set it to {derived}")
    return fields


def _rope_shape_fields(scaling: dict, source: str) -> dict:
    """The shape fields of an HF rope scaling dict (``rope_type`` llama3 or yarn); refused otherwise."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "yarn":
        return _yarn_shape_fields(scaling, source)
    fixed = {k: scaling.get(k) for k in _LLAMA3_ROPE}
    if kind != "llama3" or fixed != _LLAMA3_ROPE:
        raise SetupError(f"{source}: rope scaling {scaling} is not supported; known: rope_type 'llama3' with "
                         f"{_LLAMA3_ROPE} (megatron-core's --use-rope-scaling), or rope_type 'yarn' "
                         "(megatron-core's YaRN)")
    return dict(rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))


def shape_from_hf(cfg: dict, source: str) -> ModelShape:
    """The :class:`ModelShape` of an HF ``config.json`` dict; everything the mapping cannot
    represent exactly is refused here, naming the field."""
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise SetupError(f"{source}: architectures {archs} is not supported; known: {sorted(ARCHITECTURES)}")
    arch = archs[0]
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
                "max_position_embeddings"):
        if not isinstance(cfg.get(key), int):
            raise SetupError(f"{source}: {key} must be an int, got {cfg.get(key)!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise SetupError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported; known: ['silu']")
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise SetupError(f"{source}: head_dim {head_dim} x num_attention_heads {heads} != hidden_size {hidden}; "
                         "only head_dim = hidden_size / num_attention_heads is supported")
    if cfg.get("mlp_bias"):
        raise SetupError(f"{source}: mlp_bias true is not supported (megatron's Llama MLP has no biases)")
    qkv_bias = ARCHITECTURES[arch]
    if qkv_bias is None:  # Llama: optional, one flag for q/k/v/o
        if cfg.get("attention_bias"):
            raise SetupError(f"{source}: attention_bias true is not supported (o_proj would need a bias)")
        qkv_bias = False
    window = cfg.get("sliding_window") if arch == "MistralForCausalLM" or cfg.get("use_sliding_window") else None
    if window is not None:
        raise SetupError(f"{source}: sliding_window {window} is not supported (the attention here is full causal); "
                         "set it to null in config.json to train with full attention")
    theta, scaling = _rope(cfg, source)
    if float(theta) != int(theta):
        raise SetupError(f"{source}: rope_theta {theta} must be a whole number (megatron-core's rotary_base is an int)")
    rope = _rope_shape_fields(scaling, source) if scaling is not None else {}
    raw = dict(
        description=f"imported from {arch} ({source})",
        num_layers=cfg["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
        rotary_base=int(theta),
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
        add_qkv_bias=qkv_bias,
        **rope,
    )
    return _validated(raw, source)


def _hf_rope_scaling(shape: ModelShape) -> Optional[dict]:
    """The HF rope scaling dict of ``shape`` (None for plain RoPE)."""
    if shape.rope_scaling:
        return dict(rope_type="llama3", factor=shape.rope_scaling_factor, **_LLAMA3_ROPE)
    if shape.position_embedding_type != "yarn":
        return None
    out = dict(rope_type="yarn", factor=shape.yarn_rotary_scaling_factor,
               original_max_position_embeddings=shape.yarn_original_max_position_embeddings,
               beta_fast=shape.yarn_beta_fast, beta_slow=shape.yarn_beta_slow,
               truncate=shape.yarn_correction_range_round_to_int)
    if shape.yarn_mscale is not None:
        out.update(mscale=shape.yarn_mscale, mscale_all_dim=shape.yarn_mscale_all_dim)
    return out


def hf_config_for(cfg: dict, shape: ModelShape) -> dict:
    """``cfg`` (an HF config dict) updated to ``shape``'s context length and RoPE settings, in the
    format ``cfg`` uses (``rope_parameters`` or ``rope_theta``/``rope_scaling``). ``cfg``'s own RoPE
    entries stay as they are when they map to ``shape``'s settings (so export gives back what import read)."""
    source_shape = shape_from_hf(cfg, "the HF config")
    if shape.architecture() != source_shape.replace(vocab_size=shape.vocab_size).architecture():
        raise SetupError(f"the checkpoint's model {shape.architecture()} is not the HF config's model")
    out = dict(cfg, max_position_embeddings=shape.max_position_embeddings, vocab_size=shape.vocab_size)
    if shape_from_hf(out, "the HF config").rope_settings() == shape.rope_settings():
        return out
    scaling = _hf_rope_scaling(shape)
    out.pop("original_max_position_embeddings", None)  # transformers would take it over the scaling dict's
    if "rope_parameters" in cfg:
        out["rope_parameters"] = dict(scaling or {"rope_type": "default"}, rope_theta=float(shape.rotary_base))
    else:
        out["rope_theta"] = float(shape.rotary_base)
        out["rope_scaling"] = scaling
    return out


def _layer_shapes(shape: ModelShape) -> Dict[str, tuple]:
    h, d = shape.hidden_size, shape.hidden_size // shape.num_attention_heads
    kv = shape.num_query_groups * d
    out = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (shape.ffn_hidden_size, h),
        "mlp.up_proj.weight": (shape.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, shape.ffn_hidden_size),
    }
    if shape.add_qkv_bias:
        out.update({"self_attn.q_proj.bias": (h,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    return out


def expected_hf_shapes(shape: ModelShape) -> Dict[str, tuple]:
    """Every tensor an HF checkpoint of ``shape`` holds, name -> shape."""
    out = {"model.embed_tokens.weight": (shape.vocab_size, shape.hidden_size), "model.norm.weight": (shape.hidden_size,)}
    if not shape.share_embeddings_and_output_weights:
        out["lm_head.weight"] = (shape.vocab_size, shape.hidden_size)
    for i in range(shape.num_layers):
        out.update({f"model.layers.{i}.{k}": v for k, v in _layer_shapes(shape).items()})
    return out


def check_hf_tensors(tensors: Dict[str, tuple], shape: ModelShape, source: str) -> None:
    """``tensors`` (name -> shape) are exactly the ones ``shape`` needs."""
    expected = expected_hf_shapes(shape)
    if shape.share_embeddings_and_output_weights:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # some tied models store it anyway
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise SetupError(f"{source}: the safetensors do not match config.json: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for name, want in expected.items():
        if tuple(tensors[name]) != want:
            raise SetupError(f"{source}: {name} has shape {list(tensors[name])}, config.json implies {list(want)}")


def _qkv_groups(shape: ModelShape):
    d = shape.hidden_size // shape.num_attention_heads
    return shape.num_query_groups, shape.num_attention_heads // shape.num_query_groups, d


def _renamed(shape: ModelShape) -> List[Tuple[str, str]]:
    """``(HF name, megatron name)`` of every tensor that maps one to one (all but QKV and fc1)."""
    pairs = [("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
             ("model.norm.weight", "decoder.final_layernorm.weight")]
    if not shape.share_embeddings_and_output_weights:
        pairs.append(("lm_head.weight", "output_layer.weight"))
    for i in range(shape.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        pairs += [(f"{hf}self_attn.o_proj.weight", f"{mc}self_attention.linear_proj.weight"),
                  (f"{hf}input_layernorm.weight", f"{mc}input_layernorm.weight"),
                  (f"{hf}post_attention_layernorm.weight", f"{mc}pre_mlp_layernorm.weight"),
                  (f"{hf}mlp.down_proj.weight", f"{mc}mlp.linear_fc2.weight")]
    return pairs


def _qkv_kinds(shape: ModelShape) -> Tuple[str, ...]:
    return ("weight", "bias") if shape.add_qkv_bias else ("weight",)


def hf_to_megatron(hf: Dict[str, torch.Tensor], shape: ModelShape) -> Dict[str, torch.Tensor]:
    """HF tensors -> the state dict of a one-rank (TP 1, PP 1) megatron-core ``GPTModel``."""
    g, n, d = _qkv_groups(shape)
    out = {mc: hf[name] for name, mc in _renamed(shape)}
    for i in range(shape.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for kind in _qkv_kinds(shape):
            q, k, v = (hf[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv")
            rest = q.shape[1:]
            qkv = torch.cat([q.reshape(g, n * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
            out[f"{dst}self_attention.linear_qkv.{kind}"] = qkv.reshape(g * (n + 2) * d, *rest)
        out[f"{dst}mlp.linear_fc1.weight"] = torch.cat([hf[f"{src}mlp.gate_proj.weight"], hf[f"{src}mlp.up_proj.weight"]])
    return out


def megatron_to_hf(state: Dict[str, torch.Tensor], shape: ModelShape) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_megatron` (contiguous tensors, ready for safetensors)."""
    g, n, d = _qkv_groups(shape)
    out = {name: state[mc] for name, mc in _renamed(shape)}
    for i in range(shape.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for kind in _qkv_kinds(shape):
            qkv = state[f"{src}self_attention.linear_qkv.{kind}"]
            rest = qkv.shape[1:]
            q, k, v = qkv.reshape(g, (n + 2) * d, *rest).split([n * d, d, d], dim=1)
            out[f"{dst}self_attn.q_proj.{kind}"] = q.reshape(g * n * d, *rest)
            out[f"{dst}self_attn.k_proj.{kind}"] = k.reshape(g * d, *rest)
            out[f"{dst}self_attn.v_proj.{kind}"] = v.reshape(g * d, *rest)
        gate, up = state[f"{src}mlp.linear_fc1.weight"].chunk(2)
        out[f"{dst}mlp.gate_proj.weight"], out[f"{dst}mlp.up_proj.weight"] = gate, up
    return {k: v.contiguous() for k, v in out.items()}


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise SetupError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise SetupError(f"{path}: not valid JSON ({e})") from None


def _safetensors_files(folder: str):
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise SetupError(f"{folder}: no *.safetensors files")
    return [os.path.join(folder, f) for f in files]


def read_hf_shapes(folder: str) -> Dict[str, tuple]:
    """Tensor name -> shape over the folder's safetensors files, from their headers only."""
    from safetensors import safe_open

    shapes = {}
    for path in _safetensors_files(folder):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _read_hf_tensors(folder: str, names) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for path in _safetensors_files(folder):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys() if name in names})
    return tensors


def _one_rank_model(shape: ModelShape, dtype: torch.dtype):
    """A TP 1 / PP 1 stock ``GPTModel`` of ``shape`` with uninitialized (meta) parameters."""
    from mst_megatron.training.model_config import transformer_config
    from mst_megatron.training.pretrain import build_gpt

    config = transformer_config(shape, params_dtype=dtype, use_cpu_initialization=True)
    with torch.device("meta"):
        return build_gpt(config, shape, shape.vocab_size, None, pre_process=True, post_process=True)


def _empty_or_new(folder: str, flag: str) -> None:
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise SetupError(f"{flag} {folder}: exists and is not an empty folder; give a new or empty folder")


def import_hf(hf_folder: str, root: str) -> ModelShape:
    """Convert ``hf_folder`` into the checkpoint root ``root`` (new or empty; see the module
    docstring). All checks (architecture, config, tensor names and shapes) run before any tensor is
    read. Starts and ends a one-rank megatron-core world unless one is running. Returns the shape."""
    cfg = read_hf_config(hf_folder)
    shape = shape_from_hf(cfg, os.path.join(hf_folder, "config.json"))
    check_hf_tensors(read_hf_shapes(hf_folder), shape, hf_folder)
    _empty_or_new(root, "--save")
    from mst_megatron.training import checkpointing

    with checkpointing.one_rank_world():
        hf = _read_hf_tensors(hf_folder, expected_hf_shapes(shape))
        dtypes = {t.dtype for t in hf.values()}
        if len(dtypes) != 1:
            raise SetupError(f"{hf_folder}: tensors of several dtypes {sorted(map(str, dtypes))}; expected one")
        model = _one_rank_model(shape, dtypes.pop())
        model.load_state_dict(hf_to_megatron(hf, shape), strict=True, assign=True)
        os.makedirs(root, exist_ok=True)
        checkpointing.save_weights(root, model, shape)
    os.makedirs(os.path.join(root, HF_FOLDER))
    for name in _HF_FILES_KEPT:
        if os.path.isfile(os.path.join(hf_folder, name)):
            shutil.copy(os.path.join(hf_folder, name), os.path.join(root, HF_FOLDER, name))
    with open(os.path.join(root, MODEL_CONFIG), "w") as f:
        json.dump({k: v for k, v in shape.__dict__.items()}, f, indent=2)
    return shape


def export_hf(root: str, out_folder: str, step: Optional[int] = None, hf_folder: Optional[str] = None,
              dtype: Optional[torch.dtype] = None) -> str:
    """Write iteration ``step`` (default: the latest) of the checkpoint root ``root`` as a Hugging
    Face folder ``out_folder`` (new or empty). ``hf_folder`` (default ``root/hf``) gives the HF
    config and tokenizer files; the config gets the checkpoint's context length and RoPE settings.
    ``dtype`` defaults to the HF config's (``torch_dtype``/``dtype``), else the checkpoint's."""
    from safetensors.torch import save_file

    from mst_megatron.training import checkpointing

    hf_folder = hf_folder or os.path.join(root, HF_FOLDER)
    cfg = read_hf_config(hf_folder)
    _empty_or_new(out_folder, "--output")
    common, path = checkpointing.read_common(root, step)
    shape = ModelShape(**common["model_shape"])
    hf_cfg = hf_config_for(cfg, shape)
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    dtype = dtype or (getattr(torch, name) if isinstance(name, str) else None)
    with checkpointing.one_rank_world():
        model = _one_rank_model(shape, torch.float32).to_empty(device="cpu")
        checkpointing.load_weights(path, [model])
        tensors = megatron_to_hf(model.state_dict(), shape)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    os.makedirs(out_folder, exist_ok=True)
    for file in os.listdir(hf_folder):
        if file in _HF_FILES_KEPT and file != "config.json":
            shutil.copy(os.path.join(hf_folder, file), os.path.join(out_folder, file))
    with open(os.path.join(out_folder, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    save_file(tensors, os.path.join(out_folder, "model.safetensors"), metadata={"format": "pt"})
    return out_folder
