"""The tiny pretraining setup the training tests share: paths, a tiny model and run, and the corpus
(tokenizers and indexed datasets) built by the project's own tools."""

import importlib
import importlib.util
import json
import os
import sysconfig

from tests.helpers import ROOT

SCRIPT = os.path.join(ROOT, "examples", "pretrain_gpt_mst.py")

# A 2-layer, 64-wide model with its own 512-token tokenizer: a training step takes a fraction of a
# second on a CPU core.
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "160", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--max-position-embeddings", "128"]
RUN = ["--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "8",
       "--lr", "5e-3", "--min-lr", "5e-4", "--eval-interval", "4", "--eval-iters", "2", "--split", "90,10,0"]


def script(name):
    """``scripts/<name>.py`` as a module (the scripts are files, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_corpus(work):
    """Tokenizers (512 and 400 tokens) and two indexed datasets (stdlib sources; a .jsonl of module
    docstrings) under the folder ``work``."""
    stdlib = sysconfig.get_paths()["stdlib"]
    sources = ["--input", os.path.join(stdlib, "json"), os.path.join(stdlib, "email"), "--pattern", "*.py"]
    jsonl = work / "docs.jsonl"
    with open(jsonl, "w") as f:
        for name in ("argparse", "textwrap", "string", "shlex", "csv"):
            f.write(json.dumps({"text": importlib.import_module(name).__doc__}) + "\n")
    model = script("train_tokenizer").main(sources + ["--vocab-size", "512", "--model-prefix", str(work / "tok")])
    small = script("train_tokenizer").main(sources + ["--vocab-size", "400", "--model-prefix", str(work / "small")])
    preprocess = script("preprocess_data").main
    code = preprocess(sources + ["--tokenizer-model", model, "--output-prefix", str(work / "code"), "--append-eod"])
    docs = preprocess(["--input", str(jsonl), "--tokenizer-model", model, "--output-prefix", str(work / "docs"),
                       "--append-eod"])
    return dict(work=work, tokenizer=model, small_tokenizer=small, data=["0.8", code, "0.2", docs], code=code)
