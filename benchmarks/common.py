"""What the benchmarks share: the machine and its load, one-rank start, memory and time helpers, the
width-scaled Llama-3 model they build, and the results table ``results/rows.jsonl``.

The benchmarks are modules of the ``benchmarks`` package, run from the repository root as
``python -m benchmarks.bench_x`` (so ``mst_megatron``, ``benchmarks`` and ``tests`` import without
path edits).

Every result is a *row*: ``benchmark``, ``variant``, ``shape``, ``dtype``, ``machine`` (together the
row's key, all strings), ``metrics`` (numbers: bytes, seconds, FLOPs, ratios) and ``provenance``
(commit, whether the tree was dirty, torch and megatron-core versions, date, load average, source).
:func:`write_rows` replaces a row whose key a new row shares and keeps the others, so the table holds
the latest measurement of each case and git holds the history. ``benchmarks/tables.py`` renders the
README's tables from it.
"""

import datetime
import json
import os
import platform
import subprocess
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = os.path.join(ROOT, "benchmarks", "results", "rows.jsonl")
KEY = ("benchmark", "variant", "shape", "dtype", "machine")

# Llama-3-8B's shape scaled in width (SwiGLU, RMSNorm, GQA 8:2), and a tiny one for smoke runs.
SHAPE = dict(hidden_size=1024, ffn_hidden_size=3584, num_attention_heads=8, num_query_groups=2)
QUICK_SHAPE = dict(hidden_size=128, ffn_hidden_size=448, num_attention_heads=8, num_query_groups=2)


# ---------------------------------------------------------------- machine, start, load


def machine() -> Dict:
    """The CPU model, core count, memory and software versions of this process's machine."""
    model = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    return dict(cpu=model, logical_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def machine_name(info: Dict, threads: Optional[int] = None) -> str:
    """A row's ``machine`` from a :func:`machine` dict: ``"AMD EPYC, 2 vCPU, 2 threads"`` (``threads``
    defaults to the dict's ``torch_threads``)."""
    threads = threads or info.get("torch_threads")
    text = f"{info['cpu']}, {info['logical_cpus']} vCPU"
    return text + (f", {threads} thread{'s' * (threads != 1)}" if threads else "")


def start_one_rank(threads: Optional[int]) -> Dict:
    """Set torch's intra-op threads (None or 0: torch's default), start a one-rank megatron world
    (``mst_megatron.destroy_parallel()`` ends it) and return :func:`machine`."""
    import mst_megatron

    if threads:
        torch.set_num_threads(threads)
    mst_megatron.init_parallel()
    return machine()


def load_average() -> List[float]:
    """The 1, 5 and 15-minute load averages: how busy the (shared) machine was."""
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------- memory and time


def floor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` plus one gradient of the same size each: what any implementation holds."""
    return 2 * sum(t.numel() * t.element_size() for t in tensors)


def clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def measure_memory(step: Callable[[], None], externals: List[torch.Tensor], floor: int) -> Dict[str, int]:
    """Peak of one ``step()`` by category (``measure_peak``, allocator figure included), plus its
    ``above_floor``; gradients of ``externals`` are cleared afterwards."""
    from mst_megatron.measure.memory import measure_peak

    peak = measure_peak(step, externals, allocator=True)
    clear_grads(externals)
    peak["above_floor"] = peak["total"] - floor
    return peak


def wall_seconds(step: Callable[[], None]) -> float:
    """Wall-clock seconds of one ``step()`` (CPU: the work is done when it returns)."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def interleaved_times(steps: Dict[str, Callable[[], None]], warmup: int, repeats: int,
                      after_each: Callable[[], None] = lambda: None,
                      seconds: Callable[[Callable[[], None]], float] = wall_seconds) -> Dict[str, List[float]]:
    """Seconds per call of each step: ``warmup`` unrecorded rounds, then ``repeats`` recorded ones.

    The steps are interleaved within each round, so drifting load on a shared machine hits all alike.
    """
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            elapsed = seconds(step)
            after_each()
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def print_table(rows: List[Dict], columns: List[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


# ---------------------------------------------------------------- the whole-model benchmarks' model


def make_config(shape: Dict, dtype: torch.dtype, **overrides):
    """A Llama-style ``TransformerConfig`` of ``shape`` (one layer unless overridden), no dropout,
    CPU initialisation, parameters in ``dtype``."""
    from mst_megatron.specs.llama_config import llama_transformer_config

    fields = dict(num_layers=1, **shape, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
                  params_dtype=dtype, bf16=dtype == torch.bfloat16)
    return llama_transformer_config(**{**fields, **overrides})


def full_recompute_config(shape: Dict, dtype: torch.dtype, layers: int, method: str = "uniform",
                          layers_per_checkpoint: int = 1, **overrides):
    """:func:`make_config` with ``layers`` layers under megatron's full recompute."""
    return make_config(shape, dtype, num_layers=layers, recompute_granularity="full", recompute_method=method,
                       recompute_num_layers=layers_per_checkpoint, **overrides)


MODEL_VARIANTS = ("stock", "sdpa", "mst")


def build_model(variant: str, config, vocab: int, seq: int, mlp_mini_sequences="auto",
                lm_head_mini_sequences="auto"):
    """An untied RoPE GPT of ``config``, one of :data:`MODEL_VARIANTS`:

    * ``stock``: megatron's ``GPTModel`` with ``get_gpt_layer_local_spec`` (its attention materialises
      the ``[b, heads, s, s]`` scores) and megatron's LM head;
    * ``sdpa``: megatron's ``GPTModel`` and LM head with the MST layer spec unchunked
      (``get_gpt_mst_layer_spec(1)``: MST's SDPA attention, megatron's MLP computation), i.e. stock
      megatron-core with MST's attention kernel, the baseline that isolates the mini-sequences;
    * ``mst``: ``MSTGPTModel`` with the MST layer spec and head at the given chunk counts.

    All three have the same state-dict keys, so one's weights load into the others."""
    import mst_megatron
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if variant not in MODEL_VARIANTS:
        raise ValueError(f"variant must be one of {MODEL_VARIANTS}, got {variant!r}")
    common = dict(config=config, vocab_size=vocab, max_sequence_length=seq, position_embedding_type="rope",
                  share_embeddings_and_output_weights=False)
    if variant == "stock":
        return GPTModel(transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"), **common)
    if variant == "sdpa":
        return GPTModel(transformer_layer_spec=mst_megatron.get_gpt_mst_layer_spec(1), **common)
    return mst_megatron.MSTGPTModel(transformer_layer_spec=mst_megatron.get_gpt_mst_layer_spec(mlp_mini_sequences),
                                    lm_head_mini_sequences=lm_head_mini_sequences, **common)


def add_model_arguments(parser, seq: int, vocab: int, quick_help: str) -> None:
    """The whole-model benchmarks' ``--seq``, ``--layers`` (4), ``--vocab``, ``--quick`` and ``--rows``;
    :func:`model_arguments` finishes them."""
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    add_rows_argument(parser)


def model_arguments(args, shape: Dict, quick_shape: Dict, quick_vocab: int, quick_seq: int):
    """``args`` with ``args.shape`` set: ``shape``, or with ``--quick`` the quick shape, vocab and S."""
    args.shape = quick_shape if args.quick else shape
    if args.quick:
        args.vocab, args.seq = quick_vocab, quick_seq
    return args


def model_inputs(vocab: int, seq: int, batch: int = 1, seed: int = 0):
    """``(tokens, labels, positions)`` for a model step: random token ids and labels ``[batch, seq]``
    from a seeded generator, positions ``[1, seq]``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    return tokens, labels, torch.arange(seq).unsqueeze(0)


def model_shape(shape: Dict, layers: int, vocab: int, seq: int, batch: int = 1) -> str:
    """A whole-model row's ``shape``: ``"L=4 h=1024 ffn=3584 heads=8/2 V=128256 S=8192 b=1"``."""
    return shape_text(L=layers, h=shape["hidden_size"], ffn=shape["ffn_hidden_size"],
                      heads=f"{shape['num_attention_heads']}/{shape['num_query_groups']}", V=vocab, S=seq, b=batch)


# ---------------------------------------------------------------- rows


def shape_text(**fields) -> str:
    """A row's ``shape`` key: ``name=value`` pairs in the given order, space-separated."""
    return " ".join(f"{k}={v}" for k, v in fields.items())


def _git(*args: str) -> Optional[str]:
    """git's output in the repository, or None where this copy is no git checkout (or has no git)."""
    try:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def megatron_core_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:
        import megatron.core

        return megatron.core.__version__


def provenance(source: str, load: Optional[Sequence[float]] = None, **extra) -> Dict:
    """Where a row measured now comes from: the commit and whether tracked files other than the
    results differ from it, torch, megatron-core and Python versions, the UTC time, ``load`` (load
    averages; default now) and ``source`` (the command that measured it)."""
    commit = _git("rev-parse", "--short", "HEAD")
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    unknown = "unrecorded (not a git checkout)"
    return dict(commit=commit or unknown, dirty=unknown if changed is None else bool(changed),
                torch=torch.__version__, megatron_core=megatron_core_version(),
                python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
                load_average=list(load) if load is not None else load_average(), source=source, **extra)


def make_row(benchmark: str, variant: str, shape: str, dtype: str, machine: str, metrics: Dict,
             prov: Dict) -> Dict:
    """One row; every key field must be a non-empty string."""
    row = dict(benchmark=benchmark, variant=variant, shape=shape, dtype=dtype, machine=machine)
    for name, value in row.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"row field {name!r} must be a non-empty string, got {value!r}")
    return dict(row, metrics=metrics, provenance=prov)


def row_key(row: Dict) -> tuple:
    return tuple(row[k] for k in KEY)


def read_rows(path: str = ROWS) -> List[Dict]:
    """The rows in ``path`` (none if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_rows(rows: Iterable[Dict], path: str = ROWS) -> None:
    """Add ``rows`` to the table in ``path``, each replacing the row with its key (see :data:`KEY`);
    the file is rewritten sorted by key, one JSON object per line."""
    table = {row_key(r): r for r in read_rows(path)}
    new = list(rows)
    keys = [row_key(r) for r in new]
    if len(set(keys)) != len(keys):
        raise ValueError(f"two new rows share a key: {sorted(k for k in keys if keys.count(k) > 1)[0]}")
    table.update(zip(keys, new))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for key in sorted(table):
            f.write(json.dumps(table[key], sort_keys=True) + "\n")
    print(f"wrote {len(new)} row(s) to {path}")


def add_rows_argument(parser) -> None:
    """The ``--rows PATH`` option every benchmark takes; see :func:`rows_path`."""
    parser.add_argument("--rows", default=None,
                        help=f"results table to update ('' for none; default {os.path.relpath(ROWS, ROOT)}, "
                             "none with --quick)")


def rows_path(args) -> str:
    """``--rows`` if given, else the results table, except for ``--quick`` smoke runs ('': none)."""
    if args.rows is not None:
        return args.rows
    return "" if getattr(args, "quick", False) else ROWS
