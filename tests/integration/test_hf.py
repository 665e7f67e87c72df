"""Hugging Face checkpoints in and out (:mod:`mst_megatron.training.hf`), on tiny random models built
with ``transformers`` (real Llama / Mistral / Qwen2 classes, no download): the imported MST model's
per-token loss equals the HF model's at TP 1 and TP 2, and its loss at PP 2 and CP 2; each rotary
setting (RoPE base, Llama-3.1 scaling, YaRN) equals HF's at 4x the model's context and exports back;
export after import is bit for bit, a training run at 4x the model's max_position_embeddings goes back
to HF with the same loss at those positions, and every bad input fails with its own error before any work.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tests.helpers import rel_err  # noqa: E402
from tests.helpers import ROOT  # noqa: E402
from tests.helpers.corpus import SCRIPT  # noqa: E402
from tests.helpers.multirank import run_on_ranks  # noqa: E402

# A little Llama: 2 layers, 4 query heads in 2 groups, SwiGLU; vocab 512 fits the training corpus.
BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, dtype="float32")
ARCHS = {
    # Llama-3.1's RoPE scaling (megatron-core's --use-rope-scaling): it rescales the low frequencies.
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=8192))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)),
}
REL = 1e-5


def make_hf_model(folder, arch, seed=0, **overrides):
    """Save a randomly initialized ``arch`` model (weights far from HF's init, biases included)."""
    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    return str(folder)


def hf_token_losses(folder, tokens):
    """Per-token losses ``[b, s]`` of the HF model in ``folder`` on ``tokens [b, s+1]`` (fp32)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


def megatron_token_losses(path, shape, tokens, mst=True):
    """Per-token losses of the checkpoint folder ``path`` loaded into this world's model of ``shape``."""
    from megatron.core import parallel_state as ps

    from mst_megatron.training import checkpointing, model_config
    from mst_megatron.training.pretrain import build_gpt

    config = model_config.transformer_config(
        shape, tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(), use_cpu_initialization=True)
    chunks = dict(mlp_mini_sequences=3, lm_head_mini_sequences=3) if mst else None
    model = build_gpt(config, shape, shape.vocab_size, chunks, pre_process=True, post_process=True).eval()
    checkpointing.load_weights(path, [model])
    inputs, labels = tokens[:, :-1], tokens[:, 1:].contiguous()
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)
    with torch.no_grad():
        return model(inputs, positions, None, labels=labels).float()


def _compare_at_tp(cases, tokens, tps):
    """On each rank: every (HF folder, imported root) case at every TP size in ``tps``, MST and stock;
    the model's context is the tokens' length (as ``--max-position-embeddings`` sets it in the job)."""
    from megatron.core import parallel_state as ps

    from mst_megatron.runtime.parallel import init_parallel
    from mst_megatron.training import checkpointing
    from mst_megatron.training.model_config import ModelShape

    for tp in tps:
        init_parallel(tensor_model_parallel_size=tp)
        for folder, root in cases:
            common, path = checkpointing.read_common(root)
            shape = ModelShape(**common["model_shape"]).replace(max_position_embeddings=tokens.shape[1] - 1)
            want = hf_token_losses(folder, tokens)
            for mst in (True, False):
                got = megatron_token_losses(path, shape, tokens, mst)
                rel = rel_err(got, want)
                assert rel <= REL, f"{folder} TP{tp} mst={mst}: per-token loss rel error {rel:.2e}"
            print(f"{os.path.basename(folder)} TP{tp}: max rel error {rel:.2e}")
        ps.destroy_model_parallel()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each architecture's tiny HF folder and its imported checkpoint root."""
    from mst_megatron.training import hf

    work = tmp_path_factory.mktemp("hf")
    out = {}
    for arch in ARCHS:
        folder = make_hf_model(work / arch, arch)
        hf.import_hf(folder, str(work / f"{arch}-ckpt"))
        out[arch] = (folder, str(work / f"{arch}-ckpt"))
    return out


def test_imported_config_maps_every_setting(imported):
    from mst_megatron.training.model_config import load_model_shape

    expect = {"llama": (500000, 1e-5, False, False, True), "mistral": (10000, 1e-5, False, False, False),
              "qwen2": (1000000, 1e-6, True, True, False)}
    for arch, (folder, root) in imported.items():
        shape = load_model_shape(os.path.join(root, "model_config.json"))
        got = (shape.rotary_base, shape.norm_epsilon, shape.share_embeddings_and_output_weights, shape.add_qkv_bias,
               shape.rope_scaling)
        assert got == expect[arch], arch
        assert (shape.num_query_groups, shape.vocab_size, shape.ffn_hidden_size) == (2, 512, 96)


def test_imported_loss_equals_hf_at_tp1_and_tp2(imported):
    tokens = torch.randint(0, BASE["vocab_size"], (2, 51), generator=torch.Generator().manual_seed(1))
    run_on_ranks(_compare_at_tp, 2, list(imported.values()), tokens, (1, 2))


def test_export_after_import_is_bit_for_bit(imported, tmp_path):
    from safetensors.torch import load_file

    from mst_megatron.training import hf

    for arch, (folder, root) in imported.items():
        out = hf.export_hf(root, str(tmp_path / arch))
        before, after = load_file(os.path.join(folder, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
        assert sorted(before) == sorted(after), arch
        for name, tensor in before.items():
            assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), f"{arch}: {name}"
        with open(os.path.join(folder, "config.json")) as f, open(os.path.join(out, "config.json")) as g:
            assert json.load(f) == json.load(g), arch


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


_YARN = dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=32)


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"]), r"GPT2LMHeadModel.*known: \['LlamaForCausalLM', 'MistralForCausalLM'"),
    (dict(intermediate_size=128), r"mlp.gate_proj.weight has shape \[96, 64\], config.json implies \[128, 64\]"),
    (dict(num_hidden_layers=3), r"safetensors do not match config.json: missing \['model.layers.2"),
    (dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)), r"rope scaling .*dynamic.*not supported"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    (dict(rope_parameters=dict(_YARN, attention_factor=2.0)),
     r"yarn attention_factor 2.0 is not supported: .*\(1.138\d+ here\); remove attention_factor or set it to"),
    (dict(rope_parameters=dict(_YARN, extrapolation=2)), r"yarn field\(s\) \['extrapolation'\] are not supported; known:"),
    (dict(rope_parameters={k: v for k, v in _YARN.items() if k != "factor"}), r"yarn needs factor, a number >= 1"),
])
def test_bad_hf_folder_fails_before_any_work(tmp_path, change, message):
    from mst_megatron.training import SetupError, hf

    folder = make_hf_model(tmp_path / "m", "mistral")
    _edit_config(folder, **change)
    with pytest.raises(SetupError, match=message):
        hf.import_hf(folder, str(tmp_path / "ckpt"))
    assert not os.path.exists(tmp_path / "ckpt")


_SHAPE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
              vocab_size=512, max_position_embeddings=128, rotary_base=10000, norm_epsilon=1e-5,
              share_embeddings_and_output_weights=False, add_qkv_bias=False)
_YARN_SHAPE = dict(position_embedding_type="yarn", yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=32)


@pytest.mark.parametrize("fields, message", [
    (dict(position_embedding_type="alibi"), r"position_embedding_type 'alibi' is not supported; allowed: \['rope', 'yarn'\]"),
    (dict(position_embedding_type="yarn", yarn_rotary_scaling_factor=4.0),
     r"position_embedding_type 'yarn' needs \['yarn_original_max_position_embeddings'\]"),
    (dict(_YARN_SHAPE, rope_scaling=True), r"rope_scaling .* and position_embedding_type 'yarn' exclude each other"),
    (dict(_YARN_SHAPE, yarn_mscale=1.0), r"yarn_mscale and yarn_mscale_all_dim are used together"),
    (dict(yarn_beta_fast=16.0), r"\['yarn_beta_fast'\] apply only with position_embedding_type 'yarn', not 'rope'"),
])
def test_model_config_rope_fields_are_checked(tmp_path, fields, message):
    from mst_megatron.training import SetupError
    from mst_megatron.training.model_config import load_model_shape

    path = tmp_path / "model.json"
    path.write_text(json.dumps(dict(_SHAPE, **fields)))
    with pytest.raises(SetupError, match=message):
        load_model_shape(str(path))
    path.write_text(json.dumps(dict(_SHAPE, **_YARN_SHAPE)))
    assert load_model_shape(str(path)).yarn_config()["yarn_beta_fast"] == 32.0  # a valid YaRN shape loads


def test_bad_targets_and_vocab_padding_fail(imported, tmp_path):
    from mst_megatron.training import SetupError, checkpointing, hf
    from mst_megatron.training.model_config import load_model_shape

    folder, root = imported["mistral"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SetupError, match=r"--output .*full: exists and is not an empty folder"):
        hf.export_hf(root, str(tmp_path / "full"))
    with pytest.raises(SetupError, match=r"--save .*: exists and is not an empty folder"):
        hf.import_hf(folder, root)
    arch = load_model_shape(os.path.join(root, "model_config.json")).architecture()
    ckpt = checkpointing.find_checkpoint(root, None, None)
    run_args = argparse.Namespace(finetune=False, no_load_optim=False)
    with pytest.raises(SetupError, match=r"512 vocabulary rows, this run pads the vocabulary to 768"):
        checkpointing.check_resume(run_args, ckpt, dict(architecture=dict(arch, vocab_size=768)))
    with pytest.raises(SetupError, match=r"differs from this run's .*'num_layers': \(2, 4\)"):
        checkpointing.check_resume(run_args, ckpt, dict(architecture=dict(arch, num_layers=4)))
    checkpointing.check_resume(run_args, ckpt, dict(architecture=arch))  # the imported model itself fits


def test_train_at_4x_context_then_export_loads_in_transformers(corpus, tmp_path):
    """Import, 20 MST steps at TP 2 with 4x the model's context (256 vs 64 positions), export:
    ``transformers`` loads it, and its per-token loss on a held-out batch equals megatron's."""
    from safetensors.torch import load_file

    from mst_megatron.training import hf

    folder = make_hf_model(tmp_path / "m", "llama")
    root = str(tmp_path / "ckpt")
    hf.import_hf(folder, root)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT,
           "--model-config", os.path.join(root, "model_config.json"), "--load", root, "--save", root,
           "--tokenizer-model", corpus["tokenizer"], "--data-path", *corpus["data"], "--split", "90,10,0",
           "--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "1",
           "--seq-length", "256", "--max-position-embeddings", "256", "--micro-batch-size", "1",
           "--global-batch-size", "2", "--train-iters", "20", "--lr", "1e-3", "--eval-interval", "20",
           "--eval-iters", "1", "--mlp-mini-sequences", "3", "--lm-head-mini-sequences", "3"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"^iter\s+20/20 \| loss", run.stdout, re.M), run.stdout[-2000:]
    out = hf.export_hf(root, str(tmp_path / "long"))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["max_position_embeddings"] == 256 and cfg["rope_parameters"]["rope_type"] == "llama3"
    before, after = load_file(os.path.join(folder, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    held_out = torch.randint(0, BASE["vocab_size"], (2, 257), generator=torch.Generator().manual_seed(7))
    run_on_ranks(_compare_at_tp, 1, [(out, root)], held_out, (1,))


# Each rotary setting on a Llama whose context is 32 positions, checked at 128: plain RoPE with its base,
# Llama-3.1 scaling (megatron-core fixes its original context at 8192; the rescaled frequencies apply at
# every position), YaRN from a 32-position original context with HF's defaults, and YaRN with every field
# set (betas, the mscale ratio, the attention factor it implies, unrounded correction range).
_YARN_FULL = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=16.0, beta_slow=2.0,
                  mscale=0.707, mscale_all_dim=1.0, truncate=False)
_YARN_FULL["attention_factor"] = (0.1 * 0.707 * math.log(4.0) + 1.0) / (0.1 * 1.0 * math.log(4.0) + 1.0)
ROTARY = {
    "rope_theta": (dict(rope_type="default", rope_theta=50000.0), dict(rotary_base=50000)),
    "llama3": (dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192), dict(rotary_base=500000, rope_scaling_factor=8.0)),
    "yarn": (dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32),
             dict(position_embedding_type="yarn", yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=32,
                  yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_mscale=None, yarn_mscale_all_dim=None,
                  yarn_correction_range_round_to_int=True)),
    "yarn_all_fields": (dict(_YARN_FULL, rope_theta=20000.0),
                        dict(rotary_base=20000, yarn_beta_fast=16.0, yarn_beta_slow=2.0, yarn_mscale=0.707,
                             yarn_mscale_all_dim=1.0, yarn_correction_range_round_to_int=False)),
}


def test_rotary_settings_equal_hf_beyond_the_original_context(tmp_path):
    """Per rotary setting: import maps rope_theta / rope_scaling to megatron-core's fields; export
    writes them back (kept as read, and rebuilt from the checkpoint alone: exported over a plain-RoPE
    HF config); the imported model (MST and stock) equals the HF model per token at 4x its context,
    and the rebuilt export equals the source HF model."""
    from mst_megatron.training import hf

    plain = make_hf_model(tmp_path / "plain", "llama", max_position_embeddings=32,
                          rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    cases = []
    for name, (rope, fields) in ROTARY.items():
        folder = make_hf_model(tmp_path / name, "llama", max_position_embeddings=32, rope_parameters=rope)
        root = str(tmp_path / f"{name}-ckpt")
        shape = hf.import_hf(folder, root)
        got = {k: getattr(shape, k) for k in fields}
        assert got == fields, name
        assert shape.rope_scaling == (name == "llama3") and shape.position_embedding_type == (
            "yarn" if name.startswith("yarn") else "rope"), name
        kept, rebuilt = hf.export_hf(root, str(tmp_path / f"{name}-kept")), \
            hf.export_hf(root, str(tmp_path / f"{name}-rebuilt"), hf_folder=plain)
        assert hf.read_hf_config(kept)["rope_parameters"] == rope, name
        # rebuilt: the betas and truncate written out, the attention factor left for HF to derive
        want = {k: v for k, v in rope.items() if k != "attention_factor"}
        if name == "yarn":
            want.update(beta_fast=32.0, beta_slow=1.0, truncate=True)
        assert hf.read_hf_config(rebuilt)["rope_parameters"] == want, name
        cases.append((folder, root, rebuilt))
    tokens = torch.randint(0, BASE["vocab_size"], (2, 129), generator=torch.Generator().manual_seed(3))
    run_on_ranks(_compare_at_tp, 1, [case[:2] for case in cases], tokens, (1,))
    for folder, _, rebuilt in cases:
        rel = rel_err(hf_token_losses(rebuilt, tokens), hf_token_losses(folder, tokens))
        assert rel <= REL, f"{rebuilt}: per-token loss rel error {rel:.2e} against the source HF model"


def _mean_loss_at_layout(cases, tokens, layouts):
    """On each rank: every (HF folder, imported root) case loaded as the job loads it (its model
    chunks in DDP, ``load_weights``) at each layout (PP, CP), MST and stock (MST only at CP > 1: the
    stock local-spec attention refuses CP); the mean loss of the tokens through megatron's schedule
    equals the HF model's."""
    from megatron.core import parallel_state as ps

    from mst_megatron.runtime.parallel import init_parallel
    from mst_megatron.training import checkpointing, model_config
    from mst_megatron.training.model_config import ModelShape
    from mst_megatron.training.pretrain import build_model
    from tests.helpers.training import forward_backward

    inputs, labels = tokens[None, :, :-1], tokens[None, :, 1:].contiguous()  # one micro-batch
    for pp, cp in layouts:
        init_parallel(pipeline_model_parallel_size=pp, context_parallel_size=cp)
        for folder, root in cases:
            common, path = checkpointing.read_common(root)
            shape = ModelShape(**common["model_shape"]).replace(max_position_embeddings=inputs.shape[-1])
            want = float(hf_token_losses(folder, tokens).mean())
            config = model_config.transformer_config(shape, pipeline_model_parallel_size=pp, context_parallel_size=cp,
                                                     use_cpu_initialization=True, batch_p2p_comm=False)
            mst_model = dict(mlp_mini_sequences=3, lm_head_mini_sequences=3)
            for mst in (mst_model, None) if cp == 1 else (mst_model,):  # stock local-spec attention has no CP
                chunks = build_model(config, shape, shape.vocab_size, mst, use_distributed_optimizer=False)
                checkpointing.load_weights(path, chunks)
                for chunk in chunks:
                    chunk.eval()
                got = forward_backward(chunks, inputs, labels, forward_only=True)
                if got is not None:  # the last pipeline stage
                    rel = abs(got - want) / abs(want)
                    assert rel <= REL, f"{folder} PP{pp} CP{cp} mst={mst is not None}: loss rel error {rel:.2e}"
                    print(f"{os.path.basename(folder)} PP{pp} CP{cp} mst={mst is not None}: "
                          f"loss rel error {rel:.2e}")
        ps.destroy_model_parallel()


def test_imported_checkpoint_loads_at_pp2_and_cp2(imported, tmp_path):
    """The imported checkpoints (TP 1, one stage) load split over 2 pipeline stages (tied
    embeddings across stages: Qwen2) and over 2 context-parallel ranks (YaRN's positions sliced per
    CP rank included) with the HF model's loss."""
    from mst_megatron.training import hf

    folder = make_hf_model(tmp_path / "yarn", "llama", max_position_embeddings=32, rope_parameters=ROTARY["yarn"][0])
    hf.import_hf(folder, str(tmp_path / "yarn-ckpt"))
    cases = [imported["qwen2"], (folder, str(tmp_path / "yarn-ckpt"))]
    tokens = torch.randint(0, BASE["vocab_size"], (2, 65), generator=torch.Generator().manual_seed(5))
    run_on_ranks(_mean_loss_at_layout, 2, cases, tokens, ((2, 1), (1, 2)))
