"""FLOPs of one whole-model training step under megatron's full recompute: stock+SDPA against MST.

Counted, not timed: the models are built and stepped under ``FakeTensorMode`` (tensors with shapes and
no data), and :func:`mst_megatron.measure.flops.count_flops` (torch's ``FlopCounterMode``, CPU flash
attention included) adds up every matrix product and attention kernel the step runs. So the default,
Llama-3-8B's shape (h 4096, ffn 14336, 32 heads, 8 KV groups, vocab 128256) with 4 layers at
S = 32768, takes seconds on a CPU.

* ``stock``: megatron's ``GPTModel`` and LM head with the MST layer spec unchunked (one mini-sequence:
  megatron's MLP computation, the same SDPA attention as MST), i.e. stock megatron with SDPA.
* ``mst``: ``MSTGPTModel`` with the MST layer spec and head, chunk counts ``auto``.

Attention counts as half the dense SDPA formula (causal) unless ``--attention`` says otherwise
(``none``: torch's ``FlopCounterMode`` as it is, which does not count the CPU flash kernels).

Both: ``recompute_granularity="full"``, ``recompute_method`` (default ``uniform``) with
``recompute_num_layers`` (default 1), bf16 parameters, b = 1. The step is
``model(tokens, positions, None, labels=labels).mean().backward()``.

    python benchmarks/flops_full_recompute.py                 # Llama-3-8B shape, 4 layers, S = 32K
    python benchmarks/flops_full_recompute.py --quick         # h 128, S 2048, vocab 4096
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mst_megatron.measure.flops import ATTENTION_COUNTS, count_flops  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8)
QUICK = dict(hidden_size=128, ffn_hidden_size=448, num_attention_heads=8, num_query_groups=2)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "flops_full_recompute.json")
TERA = 1e12


def build(variant: str, config, vocab: int, seq: int):
    import mst_megatron
    from megatron.core.models.gpt import GPTModel

    common = dict(config=config, vocab_size=vocab, max_sequence_length=seq, position_embedding_type="rope",
                  share_embeddings_and_output_weights=False)
    if variant == "stock":
        return GPTModel(transformer_layer_spec=mst_megatron.get_gpt_mst_layer_spec(1), **common)
    return mst_megatron.MSTGPTModel(transformer_layer_spec=mst_megatron.get_gpt_mst_layer_spec("auto"),
                                    lm_head_mini_sequences="auto", **common)


def step_flops(variant: str, config, vocab: int, seq: int, attention: str = "causal") -> Dict[str, float]:
    """Build ``variant`` and count one step, all under fake tensors: total and decoder FLOPs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build(variant, config, vocab, seq)
        tokens = torch.zeros(1, seq, dtype=torch.long)
        positions = torch.arange(seq).unsqueeze(0)
        total, by_module = count_flops(lambda: model(tokens, positions, None, labels=tokens).mean().backward(),
                                       attention)
    decoder = sum(v for name, v in by_module.items() if name.endswith(".decoder") and name.count(".") == 1)
    return {"total": total, "decoder": decoder}


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--recompute-method", default="uniform", choices=("uniform", "block"))
    p.add_argument("--recompute-num-layers", type=int, default=1)
    p.add_argument("--attention", default="causal", choices=ATTENTION_COUNTS,
                   help="attention kernels counted causal (half the dense count), dense, or not at all "
                        "(torch's FlopCounterMode as is)")
    p.add_argument("--quick", action="store_true", help="h 128, ffn 448, vocab 4096, S 2048")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON report ('' for none)")
    args = p.parse_args(argv)
    args.shape = QUICK if args.quick else LLAMA3_8B
    if args.quick:
        args.vocab, args.seq = 4096, 2048
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    import mst_megatron
    from mst_megatron.specs.llama_config import llama_transformer_config

    args = parse_args(argv)
    mst_megatron.init_parallel()
    try:
        config = llama_transformer_config(
            num_layers=args.layers, **args.shape, hidden_dropout=0.0, attention_dropout=0.0,
            use_cpu_initialization=True, params_dtype=torch.bfloat16, bf16=True,
            recompute_granularity="full", recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers)
        flops = {v: step_flops(v, config, args.vocab, args.seq, args.attention) for v in ("stock", "mst")}
    finally:
        mst_megatron.destroy_parallel()
    report = {
        "benchmark": "FLOPs of one training step (forward + backward) under full recompute, fake tensors",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "tflop": {v: {k: x / TERA for k, x in f.items()} for v, f in flops.items()},
        "ratio_mst_over_stock": {k: flops["mst"][k] / flops["stock"][k] for k in ("total", "decoder")},
    }
    for variant, f in report["tflop"].items():
        print(f"{variant:6s} step {f['total']:9.1f} TFLOP   decoder {f['decoder']:9.1f} TFLOP")
    r = report["ratio_mst_over_stock"]
    print(f"MST/stock: step {r['total']:.3f}, decoder {r['decoder']:.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
