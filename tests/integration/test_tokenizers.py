"""``--tokenizer-type`` (mst_megatron/training/tokenizer.py): a small tokenizer of each kind built here
(sentencepiece by scripts/train_tokenizer.py, a Hugging Face ``tokenizer.json`` folder with the
``tokenizers`` library, a tiktoken vocabulary file), preprocessed by scripts/preprocess_data.py and
accepted by the job's input checks; the vocabulary checks refuse data and models that do not fit, in
one line; a Hugging Face import trains with its own ``ROOT/hf`` tokenizer folder.
"""

import base64
import collections
import glob
import json
import os
import re
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from tests.helpers import CONFIGS, ROOT
from tests.helpers.corpus import MODEL, SCRIPT, script

transformers = pytest.importorskip("transformers")
pytest.importorskip("tiktoken")

SOURCES = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")))
HF_VOCAB = 400
TIKTOKEN_SPECIALS = 16  # megatron-core's 7 named special tokens and 9 fillers
RUN = ["--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
       "--eval-interval", "2", "--eval-iters", "1", "--split", "90,10,0"]


def _hf_tokenizer(folder, text, vocab_size=HF_VOCAB):
    """A byte-level BPE trained on ``text``, saved as transformers does (tokenizer.json and
    tokenizer_config.json); ids 0, 1, 2 are <unk>, <s>, </s> (the end of document)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(folder)
    return str(folder)


def _tiktoken_vocab(path, text, words=60):
    """A tiktoken vocabulary file as megatron-core's TikTokenizer reads it: the 256 bytes, then every
    prefix of ``text``'s most common words (each one byte longer than a token before it, so BPE
    reaches it)."""
    tokens = [bytes([i]) for i in range(256)]
    seen = set(tokens)
    for word, _ in collections.Counter(re.findall(r" ?[A-Za-z_]+", text)).most_common(words):
        data = word.encode()
        for n in range(2, len(data) + 1):
            if data[:n] not in seen:
                seen.add(data[:n])
                tokens.append(data[:n])
    with open(path, "w") as f:
        json.dump([dict(rank=i, token_bytes=base64.b64encode(t).decode(), token_str=t.decode("utf-8", "replace"))
                   for i, t in enumerate(tokens)], f)
    return str(path), len(tokens)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """type -> (the tokenizer flags, its vocabulary, its end-of-document id)."""
    work = tmp_path_factory.mktemp("tokenizers")
    text = "".join(open(f).read() for f in SOURCES)
    sp = script("train_tokenizer").main(["--input", *SOURCES, "--vocab-size", "512", "--model-prefix", str(work / "sp")])
    hf = _hf_tokenizer(work / "hf", text)
    vocab_file, ranks = _tiktoken_vocab(work / "tiktoken.json", text)
    tiktoken_flags = ["--vocab-size", str(TIKTOKEN_SPECIALS + ranks), "--tiktoken-num-special-tokens",
                      str(TIKTOKEN_SPECIALS)]
    return dict(work=work, kinds={
        "SentencePieceTokenizer": (["--tokenizer-model", sp], 512, 2),
        "HuggingFaceTokenizer": (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf], HF_VOCAB, 2),
        "TikTokenizer": (["--tokenizer-type", "TikTokenizer", "--tokenizer-model", vocab_file, *tiktoken_flags],
                         TIKTOKEN_SPECIALS + ranks, 2),
    })


@pytest.fixture(scope="module")
def datasets(tokenizers):
    """type -> the prefix of the json package's sources preprocessed with that tokenizer."""
    preprocess = script("preprocess_data").main
    return {kind: preprocess(["--input", *SOURCES, *flags, "--append-eod",
                              "--output-prefix", str(tokenizers["work"] / kind)])
            for kind, (flags, _, _) in tokenizers["kinds"].items()}


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "HuggingFaceTokenizer", "TikTokenizer"])
def test_preprocessed_data_passes_the_job_checks(tokenizers, datasets, kind):
    """Each document is the tokenizer's ids and its end-of-document id; the job's checks accept the
    data with the same flags, and the model's vocabulary is the tokenizer's, padded."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from mst_megatron.training.pretrain import check_inputs

    flags, vocab, eod = tokenizers["kinds"][kind]
    inputs = check_inputs([*flags, "--data-path", datasets[kind], *MODEL, *RUN], CONFIGS)
    tokenizer = inputs.tokenizer
    assert (tokenizer.vocab_size, tokenizer.eod, inputs.vocab_size) == (vocab, eod, -(-vocab // 128) * 128)
    data = IndexedDataset(datasets[kind])
    assert len(data) == len(SOURCES)
    with open(SOURCES[0]) as f:
        assert data[0].tolist() == tokenizer.tokenize(f.read()) + [eod]
    largest = max(int(data[i].max()) for i in range(len(data)))
    assert vocab // 2 < largest < vocab  # the ids spread over the vocabulary, and stay in it


@pytest.mark.parametrize(
    "kind, data, extra, message",
    [
        ("HuggingFaceTokenizer", "SentencePieceTokenizer", [],
         r"--data-path \S+ holds token id \d+, but --tokenizer-model has 400 tokens \(HuggingFaceTokenizer \S+\): "
         r"the data was tokenized with another tokenizer$"),
        ("TikTokenizer", "TikTokenizer", ["--vocab-size", "300"],
         r"holds token id \d+, but --tokenizer-model has 300 tokens \(TikTokenizer \S+tiktoken\.json\)"),
        # the item 5 case: a tokenizer whose vocabulary does not fit the model
        ("SentencePieceTokenizer", "SentencePieceTokenizer", ["--model-config", "{small}"],
         r"--tokenizer-model has 512 tokens \(SentencePieceTokenizer \S+sp\.model\), more than the model's vocab_size "
         r"256 \(--model-config \S+small\.json\): use the model's tokenizer, or a model config with vocab_size >= 512 "
         r"or null \(the tokenizer's\)$"),
        ("HuggingFaceTokenizer", "HuggingFaceTokenizer", ["--model-config", "{small}"],
         r"--tokenizer-model has 400 tokens \(HuggingFaceTokenizer \S+\), more than the model's vocab_size 256"),
        ("TikTokenizer", "TikTokenizer", ["--model-config", "{small}"],
         r"--tokenizer-model has \d+ tokens \(TikTokenizer \S+\), more than the model's vocab_size 256"),
        # the tokenizer flags
        ("SentencePieceTokenizer", "SentencePieceTokenizer", ["--vocab-size", "600"],
         r"--vocab-size applies to --tokenizer-type TikTokenizer only; a SentencePieceTokenizer's vocabulary is its "
         r"file's: drop --vocab-size$"),
        ("TikTokenizer", "TikTokenizer", ["--vocab-size", str(10**4)],
         r"--tokenizer-model \S+tiktoken\.json: not a tiktoken vocabulary \.json file that megatron-core's "
         r"TikTokenizer loads \(.*\); it holds \d+ ranks, but --vocab-size 10000 minus --tiktoken-num-special-tokens "
         r"16 needs 9984: pass --vocab-size \d+ or less$"),
        ("TikTokenizer", "TikTokenizer", ["--tiktoken-num-special-tokens", "4"],
         r"--tiktoken-num-special-tokens 4 must be >= 7 \(megatron-core's named special tokens\) and < --vocab-size"),
        ("HuggingFaceTokenizer", "HuggingFaceTokenizer", ["--tokenizer-model", "/nonexistent/hf"],
         r"--tokenizer-model /nonexistent/hf: no such folder \(a Hugging Face tokenizer folder \(tokenizer\.json\) for "
         r"--tokenizer-type HuggingFaceTokenizer\)$"),
        ("TikTokenizer", "TikTokenizer", ["--tokenizer-model", "{sp}"],
         r"--tokenizer-model \S+sp\.model: --tokenizer-type TikTokenizer takes a tiktoken vocabulary \.json file$"),
        ("HuggingFaceTokenizer", "HuggingFaceTokenizer", ["--tokenizer-model", "{work}"],
         r"--tokenizer-model \S+: not a Hugging Face tokenizer folder \(tokenizer\.json\) that megatron-core's "
         r"HuggingFaceTokenizer loads"),
    ],
)
def test_a_tokenizer_that_does_not_fit_is_refused_in_one_line(tokenizers, datasets, tmp_path, monkeypatch, capsys,
                                                              kind, data, extra, message):
    """Exit code 2 and one line naming the flag, before any work (the job's entry point)."""
    from mst_megatron.training import pretrain

    small = tmp_path / "small.json"
    with open(os.path.join(CONFIGS, "tiny.json")) as f:
        small.write_text(json.dumps(dict(json.load(f), vocab_size=256)))
    places = {"{small}": str(small), "{sp}": tokenizers["kinds"]["SentencePieceTokenizer"][0][1],
              "{work}": str(tokenizers["work"])}
    argv = [*tokenizers["kinds"][kind][0], "--data-path", datasets[data], *MODEL, *RUN,
            *[places.get(word, word) for word in extra]]
    monkeypatch.setenv("RANK", "0")
    assert pretrain.main(argv, CONFIGS) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pretrain_gpt_mst.py: error: --"), err
    assert re.search(message, err), err


def test_append_eod_needs_an_end_of_document_token(tokenizers, tmp_path):
    """A bare tokenizer.json folder (no tokenizer_config.json) has no eos token: --append-eod is refused."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(tokenizers["kinds"]["HuggingFaceTokenizer"][0][3], "tokenizer.json"), bare)
    with pytest.raises(SystemExit, match=r"--append-eod: HuggingFaceTokenizer \S+bare has no end-of-document token"):
        script("preprocess_data").main(["--input", SOURCES[0], "--tokenizer-type", "HuggingFaceTokenizer",
                                       "--tokenizer-model", str(bare), "--append-eod",
                                       "--output-prefix", str(tmp_path / "x")])


def test_hf_import_trains_with_its_tokenizer_folder(tokenizers, tmp_path):
    """A Llama folder with its tokenizer, imported: preprocessing and a 2-step run take the import's
    ``ROOT/hf`` as the tokenizer (import_hf.py's documented command)."""
    import torch

    from mst_megatron.training import hf

    folder = tmp_path / "llama"
    config = transformers.LlamaConfig(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, dtype="float32")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    _hf_tokenizer(folder, "".join(open(f).read() for f in SOURCES))
    root = tmp_path / "ckpt"
    hf.import_hf(str(folder), str(root))
    tokenizer = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(root / "hf")]
    data = script("preprocess_data").main(["--input", *SOURCES, *tokenizer, "--append-eod", "--workers", "1",
                                          "--output-prefix", str(tmp_path / "data")])
    cmd = [sys.executable, SCRIPT, "--model-config", str(root / "model_config.json"), "--load", str(root),
           *tokenizer, "--data-path", data, "--make-vocab-size-divisible-by", "1", *RUN]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"vocab {HF_VOCAB} (tokenizer {HF_VOCAB}, HuggingFaceTokenizer)" in run.stdout, run.stdout[-2000:]
    losses = [float(m) for m in re.findall(r"^iter\s+\d+/2 \| loss ([0-9.]+)", run.stdout, re.M)]
    assert len(losses) == 2 and all(np.isfinite(losses)), run.stdout[-2000:]
