"""Stock megatron-core against MST on one CUDA GPU: peak memory and time of forward + backward.

The GPU counterpart of ``bench_lm_head``, ``bench_mlp`` and ``bench_model_step``, in one
process with the baseline and MST side by side. Each case builds its variants with the same weights
and inputs and, per variant:

* memory: one step under :func:`mst_megatron.measure.memory.measure_cuda_peak`
  (``torch.cuda.max_memory_allocated``): the peak above what was allocated before the step, and
  ``above floor``, that peak less what the step leaves allocated (its gradients), i.e. the transient
  memory a long sequence runs out of;
* exactness: the outputs (per-token loss or MLP output) and the gradients named per case, relative
  error against the first variant (stock): the benchmark times computations that agree;
* time: CUDA events around each step, after ``--warmup`` rounds, ``--repeats`` rounds with the
  variants interleaved; the median, and MST/stock ratios.

A variant that runs out of GPU memory is recorded as ``oom`` and not tried at longer sequences.

Cases (bf16 unless named; b=1):

* ``lm_head``: megatron's output layer + vocab-parallel cross-entropy against the MST head, V=128256,
  at Llama-3-8B's hidden size 4096 (8K, 32K) and at the CPU benchmark's 1024 in fp32 (8K).
* ``mlp``: megatron's ``MLP`` against ``MiniSequenceMLP`` (auto chunks), Llama-3-8B's shape (4096,
  ffn 14336) at 8K and 32K, and the CPU benchmark's scaled shape (1024, 3584) in fp32 at 8K.
* ``layer``: one Llama-3-8B layer under full recompute: local spec, MST spec with one mini-sequence,
  MST spec.
* ``model``: a 4-layer Llama-3-8B-wide GPT (untied, V=128256, full recompute): stock (local spec),
  ``sdpa`` (GPTModel, MST layer spec unchunked: the attention alone) and MST (layer spec + head),
  at 8K, 32K, 64K and 128K.

Rows: benchmark ``cuda_<part>`` (``cuda_lm_head``, ``cuda_mlp``, ``cuda_layer_full_recompute``,
``cuda_model_step``, ``cuda_reach``), machine the GPU's name, one per variant and shape, written
after every case. On the GPU machine write them under its output folder and merge them here with
``python -m benchmarks.tables --merge cuda-results/rows.jsonl``.

    python -m benchmarks.bench_cuda --rows out/rows.jsonl              # everything (~3-4 min on an H200)
    python -m benchmarks.bench_cuda --quick                            # tiny shapes, seconds (CPU too), no rows
    python -m benchmarks.bench_cuda --reach 32 --rows out/rows.jsonl   # Llama-3-8B: how long a sequence fits

On a machine without CUDA (``--quick`` only) the same code runs on the CPU with wall-clock times
and no memory figures: a smoke test of the script, not a measurement.
"""

import argparse
import gc
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.bench_lm_head import build_head, mst_step, stock_step
from benchmarks.bench_mlp import variants
from benchmarks.common import (QUICK_SHAPE, SHAPE, add_rows_argument, build_model, full_recompute_config,
                               interleaved_times, load_average, machine_name, make_row, model_inputs, provenance,
                               rows_path, shape_text, start_one_rank, wall_seconds, write_rows)
from mst_megatron.measure.memory import format_bytes, measure_cuda_peak

LLAMA3_8B = dict(hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8)
VOCAB = 128256
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def cuda_seconds(step: Callable[[], None]) -> float:
    """Seconds of one ``step()`` between two CUDA events (the GPU's time, not the launch's)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Case:
    """Variants of one computation: ``steps[name]()`` runs forward + backward and returns the tensors
    to compare with the first variant's; ``clear()`` drops the gradients between runs."""

    def __init__(self, part: str, label: Dict, steps: Dict[str, Callable[[], List[torch.Tensor]]],
                 clear: Callable[[], None], compared: List[str], rounds: Optional[tuple] = None):
        self.part, self.label, self.steps, self.clear, self.compared = part, label, steps, clear, compared
        self.rounds = rounds  # (warmup, repeats) instead of the command line's, for the longest cases

    def run(self, args, out_of_memory: set) -> Dict:
        rows, reference, runnable = {}, None, {}
        for name, step in self.steps.items():
            if (self.part, name) in out_of_memory:
                rows[name] = dict(skipped="ran out of memory at a shorter sequence")
                continue
            captured = {}
            try:
                if torch.cuda.is_available():
                    memory = measure_cuda_peak(lambda: captured.update(out=step()))
                else:
                    captured.update(out=step())
                    memory = {}
            except torch.OutOfMemoryError as e:
                captured.clear()
                self.clear()
                free_memory()
                out_of_memory.add((self.part, name))
                rows[name] = dict(oom=True, error=str(e).split("\n")[0][:200])
                print(f"  {self.part} {name}: out of memory", flush=True)
                continue
            out = [t.detach().float() for t in captured.pop("out")]
            self.clear()
            row = dict(memory=memory)
            if reference is None:
                reference = out
            else:
                row["rel_err"] = {what: rel_err(a, b) for what, a, b in zip(self.compared, out, reference)}
            rows[name] = row
            runnable[name] = step
            del out
        reference = None
        free_memory()
        seconds = cuda_seconds if torch.cuda.is_available() else wall_seconds
        warmup, repeats = self.rounds or (args.warmup, args.repeats)
        times = interleaved_times(runnable, warmup, repeats, after_each=self.clear, seconds=seconds)
        for name, ts in times.items():
            rows[name].update(time_s=statistics.median(ts), times_s=ts)
        result = dict(part=self.part, **self.label, variants=rows)
        add_ratios(result)
        return result


def add_ratios(result: Dict) -> None:
    """Against the first variant that ran: above-floor ratio and time ratio (MST / baseline)."""
    names = [n for n, v in result["variants"].items() if "memory" in v]
    if not names:
        return
    base = result["variants"][names[0]]
    for name in names[1:]:
        v = result["variants"][name]
        if base["memory"] and v["memory"]:
            v["above_floor_ratio"] = v["memory"]["above_floor"] / max(base["memory"]["above_floor"], 1)
            v["peak_ratio"] = v["memory"]["peak_above_start"] / max(base["memory"]["peak_above_start"], 1)
        v["time_ratio"] = statistics.median(m / s for m, s in zip(v["times_s"], base["times_s"]))


# ---------------------------------------------------------------- the cases


def lm_head_case(device, hidden_size: int, seq: int, dtype, vocab: int = VOCAB) -> Case:
    head = build_head(hidden_size, vocab, dtype).to(device)
    g = torch.Generator().manual_seed(seq)
    hidden = torch.randn(seq, 1, hidden_size, generator=g).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (1, seq), generator=g).to(device)

    def with_grads(step):
        return lambda: [step(), hidden.grad, head.weight.grad]

    def clear():
        hidden.grad = head.weight.grad = None

    steps = {"stock": with_grads(stock_step(head, hidden, labels)),
             "mst": with_grads(mst_step(head, hidden, labels, "auto"))}
    return Case("lm_head", dict(seq=seq, hidden=hidden_size, vocab=vocab, dtype=str(dtype)[6:]),
                steps, clear, ["loss", "hidden grad", "weight grad"])


def module_case(part: str, device, shape: Dict, seq: int, dtype) -> Case:
    """``mlp``: stock MLP vs MST MLP; ``layer``: local spec vs MST spec M=1 vs MST spec, full recompute."""
    _, modules, _ = variants(part, shape, dtype, "auto", seq)
    if part == "mlp":  # megatron's MLP chunks run inside a layer (residual added): not comparable here
        modules.pop("mcore-chunks", None)
    g = torch.Generator().manual_seed(seq)
    x = torch.randn(seq, 1, shape["hidden_size"], generator=g).to(device, dtype).requires_grad_()
    grad_out = torch.randn(seq, 1, shape["hidden_size"], generator=g).to(device, dtype)
    kwargs = {} if part == "mlp" else {"attention_mask": None}
    params = {name: list(m.to(device).parameters()) for name, m in modules.items()}

    def step_of(module, name):
        def step():
            out = module(x, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            out.backward(grad_out)
            return [out, x.grad, params[name][0].grad]
        return step

    def clear():
        x.grad = None
        for ps in params.values():
            for p in ps:
                p.grad = None

    return Case(part, dict(seq=seq, **shape, dtype=str(dtype)[6:]),
                {name: step_of(m, name) for name, m in modules.items()}, clear,
                ["output", "input grad", "first weight grad"])


def model_case(device, shape: Dict, layers: int, seq: int, dtype, vocab: int = VOCAB) -> Case:
    config = full_recompute_config(shape, dtype, layers, use_cpu_initialization=False)
    # megatron's torch norms are built on the CPU whatever the config: move every model.
    models = {name: build_model(name, config, vocab, seq).to(device) for name in ("stock", "sdpa", "mst")}
    weights = models["stock"].state_dict()
    for model in models.values():
        model.load_state_dict(weights, strict=True)
    del weights
    if dtype != torch.float32:  # as megatron trains in bf16: every parameter bf16, the loss in fp32
        from megatron.core.transformer.module import Float16Module

        models = {name: Float16Module(config, model) for name, model in models.items()}
    tokens, labels, positions = (t.to(device) for t in model_inputs(vocab, seq, seed=seq))

    def step_of(model):
        def step():
            loss = model(tokens, positions, None, labels=labels)
            loss.mean().backward()
            inner = getattr(model, "module", model)
            return [loss, inner.embedding.word_embeddings.weight.grad, inner.output_layer.weight.grad]
        return step

    def clear():
        for model in models.values():
            model.zero_grad(set_to_none=True)

    # From 64K a step takes seconds: the memory run is the warm-up, one timed round.
    return Case("model", dict(seq=seq, layers=layers, **shape, vocab=vocab, dtype=str(dtype)[6:]),
                {name: step_of(m) for name, m in models.items()}, clear,
                ["loss", "embedding grad", "head weight grad"], rounds=(0, 1) if seq >= 65536 else None)


def reach(args, device, layers: int, save: Callable[[List[Dict]], None], dtype=torch.bfloat16) -> List[Dict]:
    """How far each variant gets: a ``layers``-layer Llama-3-8B-shaped GPT (32 layers: the real
    model), ``sdpa`` then ``mst``, one model at a time, one forward + backward per sequence length in
    ``args.reach_seqs`` (ascending) until one runs out of memory. Weights, gradients and activations
    only: no optimizer state (Adam's would not fit one GPU beside an 8B model's weights). ``save(rows)``
    runs after every step."""
    config = full_recompute_config(LLAMA3_8B, dtype, layers, use_cpu_initialization=False)
    from megatron.core.transformer.module import Float16Module

    rows = []
    for name in ("sdpa", "mst"):
        model = Float16Module(config, build_model(name, config, VOCAB, max(args.reach_seqs)).to(device))
        for seq in sorted(args.reach_seqs):
            tokens, labels, positions = (t.to(device) for t in model_inputs(VOCAB, seq, seed=seq))
            memory = {}

            def step():
                memory.update(measure_cuda_peak(
                    lambda: model(tokens, positions, None, labels=labels).mean().backward()))

            row = dict(part="reach", variant=name, layers=layers, seq=seq)
            try:
                row["time_s"] = cuda_seconds(step)
                row["memory"] = memory
                row["peak_bytes"] = memory["start"] + memory["peak_above_start"]
            except torch.OutOfMemoryError as e:
                row.update(oom=True, error=str(e).split("\n")[0][:200])
            model.zero_grad(set_to_none=True)
            del tokens, labels, positions
            free_memory()
            rows.append(row)
            save(rows)
            print(f"reach {name} layers={layers} S={seq}: "
                  + ("OOM" if row.get("oom") else f"peak {format_bytes(row['peak_bytes'])}, {row['time_s']:.1f} s"),
                  flush=True)
            if row.get("oom"):
                break
        del model
        free_memory()
    return rows


def build_cases(args, device) -> List[Callable[[], Case]]:
    """The cases to run, most important first (each is built only when its turn comes), as
    ``(part, builder)`` pairs."""
    if args.quick:
        small = dict(QUICK_SHAPE)
        return [("lm_head", lambda: lm_head_case(device, 64, 512, torch.float32, vocab=4096)),
                ("mlp", lambda: module_case("mlp", device, small, 512, torch.float32)),
                ("layer", lambda: module_case("layer", device, small, 256, torch.float32)),
                ("model", lambda: model_case(device, small, 2, 256, torch.float32, vocab=4096))]
    bf16, fp32 = torch.bfloat16, torch.float32
    cases = [("lm_head", lambda: lm_head_case(device, 4096, 8192, bf16)),
             ("lm_head", lambda: lm_head_case(device, 1024, 8192, fp32)),
             ("mlp", lambda: module_case("mlp", device, LLAMA3_8B, 8192, bf16)),
             ("mlp", lambda: module_case("mlp", device, SHAPE, 8192, fp32)),
             ("layer", lambda: module_case("layer", device, LLAMA3_8B, 8192, bf16)),
             ("lm_head", lambda: lm_head_case(device, 4096, 32768, bf16)),
             ("mlp", lambda: module_case("mlp", device, LLAMA3_8B, 32768, bf16))]
    cases += [("model", lambda s=s: model_case(device, LLAMA3_8B, 4, s, bf16)) for s in args.model_seqs]
    return cases


def summary_line(result: Dict) -> str:
    keys = ("seq", "hidden_size", "hidden", "layers", "dtype")
    head = f"{result['part']:7s} " + " ".join(f"{k}={result[k]}" for k in keys if k in result)
    parts = []
    for name, v in result["variants"].items():
        if "memory" not in v:
            parts.append(f"{name}: {'OOM' if v.get('oom') else 'skipped'}")
            continue
        text = f"{name}: {v['time_s'] * 1e3:.1f} ms"
        if v["memory"]:
            text += f", above floor {format_bytes(v['memory']['above_floor'])}"
        if "time_ratio" in v:
            text += f" (time x{v['time_ratio']:.3f}"
            text += f", memory x{v['above_floor_ratio']:.4f})" if "above_floor_ratio" in v else ")"
        if "rel_err" in v:
            text += " err " + ",".join(f"{e:.1e}" for e in v["rel_err"].values())
        parts.append(text)
    return head + "\n    " + "\n    ".join(parts)


BENCHMARKS = {"lm_head": "cuda_lm_head", "mlp": "cuda_mlp", "layer": "cuda_layer_full_recompute",
              "model": "cuda_model_step", "reach": "cuda_reach"}
SHAPE_NAMES = {"layers": "L", "hidden": "h", "hidden_size": "h", "ffn_hidden_size": "ffn", "vocab": "V", "seq": "S"}
DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32"}


def case_shape(result: Dict) -> str:
    """A row's ``shape`` from a case's label: ``L h ffn heads V S`` as far as the case has them, b=1."""
    if result["part"] == "reach":
        result = dict(result, **LLAMA3_8B, vocab=VOCAB)
    fields = {SHAPE_NAMES[k]: result[k] for k in ("layers", "hidden", "hidden_size", "ffn_hidden_size") if k in result}
    if "num_attention_heads" in result:
        fields["heads"] = f"{result['num_attention_heads']}/{result['num_query_groups']}"
    fields.update({SHAPE_NAMES[k]: result[k] for k in ("vocab", "seq") if k in result})
    return shape_text(**fields, b=1)


def variant_metrics(v: Dict) -> Dict:
    """A variant's measurements as row metrics: the memory figures in bytes, times, errors, OOM."""
    metrics = {f"{k}_bytes": x for k, x in v.get("memory", {}).items()}
    metrics.update({k: v[k] for k in ("peak_bytes", "time_s", "times_s", "rel_err", "oom", "error", "skipped")
                    if k in v})
    return metrics


def report_rows(report: Dict, prov: Dict) -> List[Dict]:
    """One row per variant of every case (or reach step) in a report of :func:`main`."""
    name = report["gpu"]["name"] if "gpu" in report else machine_name(report["machine"])
    rows = []
    for r in report["results"]:
        variants_ = r["variants"] if "variants" in r else {r["variant"]: r}
        dtype = DTYPE_NAMES.get(r.get("dtype", "bfloat16"))
        for variant, v in variants_.items():
            rows.append(make_row(BENCHMARKS[r["part"]], variant, case_shape(r), dtype, name, variant_metrics(v), prov))
    return rows


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_rows_argument(p)
    p.add_argument("--model-seqs", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds; cases not started by then are listed as not run")
    p.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke run (CPU too)")
    p.add_argument("--parts", nargs="+", choices=("lm_head", "mlp", "layer", "model"),
                   help="run only the cases of these parts (default: all)")
    p.add_argument("--reach", type=int, metavar="LAYERS",
                   help="instead of the cases: the longest sequence a LAYERS-layer Llama-3-8B-shaped GPT "
                        "runs forward + backward, sdpa vs MST (see reach())")
    p.add_argument("--reach-seqs", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.quick:
        raise SystemExit("bench_cuda.py measures a CUDA GPU; without one only --quick (a smoke run) works")
    import mst_megatron

    started = time.perf_counter()
    report = dict(config=vars(args), machine=start_one_rank(None))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        props = torch.cuda.get_device_properties(device)
        report["gpu"] = dict(name=props.name, memory_bytes=props.total_memory, cuda=torch.version.cuda,
                             tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                             alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    report["results"], report["not_run"] = [], []
    path = rows_path(args)
    prov = provenance("python -m benchmarks.bench_cuda", gpu=report.get("gpu"))

    def save(results):
        report["results"] = results
        if path:  # after every case: a run cut short keeps what it measured
            write_rows(report_rows(report, prov), path)

    if args.reach:
        reach(args, device, args.reach, save)
    out_of_memory: set = set()
    cases = [] if args.reach else [(p, b) for p, b in build_cases(args, device) if not args.parts or p in args.parts]
    for i, (_, build) in enumerate(cases):
        if time.perf_counter() - started > args.time_budget:
            report["not_run"].append(i)
            continue
        case = build()
        result = case.run(args, out_of_memory)
        del case
        free_memory()
        save(report["results"] + [result])
        print(summary_line(result), flush=True)
    report["seconds"] = time.perf_counter() - started
    save(report["results"])
    print(f"{report['seconds']:.0f} s; cases not run: {report['not_run']}; load average now {load_average()}")
    mst_megatron.destroy_parallel()
    return report


if __name__ == "__main__":
    main()
