"""FLOPs of one whole-model training step under megatron's full recompute: stock+SDPA against MST.

Counted, not timed: the models are built and stepped under ``FakeTensorMode`` (tensors with shapes and
no data), and :func:`mst_megatron.measure.flops.count_flops` (torch's ``FlopCounterMode``, CPU flash
attention included) adds up every matrix product and attention kernel the step runs. So the default,
Llama-3-8B's shape (h 4096, ffn 14336, 32 heads, 8 KV groups, vocab 128256) with 4 layers at
S = 32768, takes seconds on a CPU.

* ``sdpa``: megatron's ``GPTModel`` and LM head with the MST layer spec unchunked (one mini-sequence:
  megatron's MLP computation, the same SDPA attention as MST), i.e. stock megatron with SDPA.
* ``mst``: ``MSTGPTModel`` with the MST layer spec and head, chunk counts ``auto``.

(:func:`benchmarks.common.build_model`.) Attention counts as half the dense SDPA formula (causal)
unless ``--attention`` says otherwise (``none``: torch's ``FlopCounterMode`` as it is, which does not
count the CPU flash kernels).

Both: ``recompute_granularity="full"``, ``recompute_method`` (default ``uniform``) with
``recompute_num_layers`` (default 1), bf16 parameters, b = 1. The step is
``model(tokens, positions, None, labels=labels).mean().backward()``. One row per variant (benchmark
``flops_full_recompute``; the attention count and recompute method are in its ``variant``; machine
``fake tensors``: the counts do not depend on the machine).

    python -m benchmarks.flops_full_recompute                 # Llama-3-8B shape, 4 layers, S = 32K
    python -m benchmarks.flops_full_recompute --attention none
    python -m benchmarks.flops_full_recompute --quick         # h 128, S 2048, vocab 4096, no rows
"""

import argparse
from typing import Dict, List, Optional

import torch

from benchmarks.common import (QUICK_SHAPE, add_model_arguments, build_model, full_recompute_config, make_row,
                               model_arguments, model_shape, provenance, rows_path, write_rows)
from mst_megatron.measure.flops import ATTENTION_COUNTS, count_flops

LLAMA3_8B = dict(hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8)
TERA = 1e12


def step_flops(variant: str, config, vocab: int, seq: int, attention: str = "causal") -> Dict[str, float]:
    """Build ``variant`` (``sdpa`` or ``mst``) and count one step, all under fake tensors: total and
    decoder FLOPs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(variant, config, vocab, seq)
        tokens = torch.zeros(1, seq, dtype=torch.long)
        positions = torch.arange(seq).unsqueeze(0)
        total, by_module = count_flops(lambda: model(tokens, positions, None, labels=tokens).mean().backward(),
                                       attention)
    decoder = sum(v for name, v in by_module.items() if name.endswith(".decoder") and name.count(".") == 1)
    return {"total": total, "decoder": decoder}


def report_rows(args, flops: Dict[str, Dict[str, float]], prov: Dict) -> List[Dict]:
    shape = model_shape(args.shape, args.layers, args.vocab, args.seq)
    recompute = f"{args.recompute_method} {args.recompute_num_layers}"
    return [make_row("flops_full_recompute", f"{v}, attention {args.attention}, recompute {recompute}", shape, "bf16",
                     "fake tensors", {"flop": f["total"], "decoder_flop": f["decoder"]}, prov)
            for v, f in flops.items()]


def parse_args(argv: Optional[List[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p, seq=32768, vocab=128256, quick_help="h 128, ffn 448, vocab 4096, S 2048")
    p.add_argument("--recompute-method", default="uniform", choices=("uniform", "block"))
    p.add_argument("--recompute-num-layers", type=int, default=1)
    p.add_argument("--attention", default="causal", choices=ATTENTION_COUNTS,
                   help="attention kernels counted causal (half the dense count), dense, or not at all "
                        "(torch's FlopCounterMode as is)")
    return model_arguments(p.parse_args(argv), LLAMA3_8B, QUICK_SHAPE, quick_vocab=4096, quick_seq=2048)


def main(argv: Optional[List[str]] = None) -> Dict:
    import mst_megatron

    args = parse_args(argv)
    prov = provenance("python -m benchmarks.flops_full_recompute")
    mst_megatron.init_parallel()
    try:
        config = full_recompute_config(args.shape, torch.bfloat16, args.layers, args.recompute_method,
                                       args.recompute_num_layers)
        flops = {v: step_flops(v, config, args.vocab, args.seq, args.attention) for v in ("sdpa", "mst")}
    finally:
        mst_megatron.destroy_parallel()
    for variant, f in flops.items():
        print(f"{variant:6s} step {f['total'] / TERA:9.1f} TFLOP   decoder {f['decoder'] / TERA:9.1f} TFLOP")
    print(f"MST / sdpa (stock megatron-core with MST's SDPA attention): step "
          f"{flops['mst']['total'] / flops['sdpa']['total']:.3f}, decoder "
          f"{flops['mst']['decoder'] / flops['sdpa']['decoder']:.3f}")
    path = rows_path(args)
    if path:
        write_rows(report_rows(args, flops, prov), path)
    return flops


if __name__ == "__main__":
    main()
