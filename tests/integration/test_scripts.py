"""The command-line scripts as a user runs them: one-line errors and exit code 2 on bad input."""

import os
import subprocess
import sys

from tests.helpers import ROOT


def test_cli_bad_input_is_one_line_and_exit_2():
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "plan_parallel.py"), "--config", "llama3-8b", "--nodes", "3",
           "--gpus-per-node", "8", "--seq-length", "131072", "--gpu-memory-gib", "80",
           "--tensor-model-parallel-size", "8", "--context-parallel-size", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("plan_parallel.py: error: 3 nodes x 8 GPUs = 24 GPUs is not divisible by "
                             "--tensor-model-parallel-size (8) x --pipeline-model-parallel-size (1) x "
                             "--context-parallel-size (2) = 16\n")


def test_hf_scripts_bad_input_is_one_line_and_exit_2(tmp_path):
    for script, args, message in (
        ("import_hf.py", ["--hf-folder", str(tmp_path / "none"), "--save", str(tmp_path / "ckpt")],
         f"import_hf.py: error: {tmp_path / 'none'}: no config.json (expected a Hugging Face model folder)\n"),
        ("export_hf.py", ["--load", str(tmp_path / "none"), "--output", str(tmp_path / "out")],
         f"export_hf.py: error: {tmp_path / 'none' / 'hf'}: no config.json (expected a Hugging Face model folder)\n"),
    ):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *args],
                                capture_output=True, text=True, timeout=120)
        assert (result.returncode, result.stdout, result.stderr) == (2, "", message)
