"""The README's result tables and plot, rendered from the rows in ``results/rows.jsonl``.

A table lives in the README between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; NAME is a
key of :data:`TABLES`. Every ratio is MST over a named baseline on the same machine, shape and dtype.

    python -m benchmarks.tables                  # rewrite the README's tables and the plots in results/
    python -m benchmarks.tables --check          # exit 1 if the README's tables differ from the rows
    python -m benchmarks.tables --merge cuda-results/rows.jsonl   # add a GPU run's rows (then rewrite)
"""

import argparse
import os
import re
import sys
from typing import Callable, Dict, List, Optional

from benchmarks.common import ROOT, ROWS, read_rows, write_rows

README = os.path.join(ROOT, "README.md")
PLOT = os.path.join(ROOT, "benchmarks", "results", "reach_h200.png")
CP_PLOT = os.path.join(ROOT, "benchmarks", "results", "context_parallel_cpu.png")
REACH_PLOT = os.path.join(ROOT, "benchmarks", "results", "reach_simulated.png")
CP_COMM_TYPES = ("a2a", "p2p", "a2a+p2p")
DEVELOPERS_CPU = "AMD EPYC, 2 vCPU, 2 threads"
XEON = "Intel(R) Xeon(R) Processor, 2 vCPU, 2 threads"
H200 = "NVIDIA H200"
H200_GIB = 139.8  # what torch reports as the card's total memory

WHAT = {"mlp": "MLP alone", "layer_full_recompute": "one layer, full recompute", "lm_head": "LM head + cross-entropy",
        "model_step": "whole model step, full recompute", "cuda_lm_head": "LM head + cross-entropy",
        "cuda_mlp": "MLP alone", "cuda_layer_full_recompute": "one layer, full recompute",
        "cuda_model_step": "whole model step, full recompute"}
LOCAL_SPEC = "megatron-core, local spec (attention through `[s, s]` scores)"
SDPA = "megatron-core with MST's SDPA attention"
BASELINES = {"stock": {"mlp": "megatron-core `MLP`", "cuda_mlp": "megatron-core `MLP`",
                       "lm_head": "megatron-core output layer + CE", "cuda_lm_head": "megatron-core output layer + CE"},
             "sdpa": SDPA, "mst-M1": SDPA + " (MST spec, M = 1)", "mcore-chunks": "megatron-core's MLP chunks"}


def baseline_name(benchmark: str, variant: str) -> str:
    name = BASELINES[variant.split(" M=")[0]]
    return name.get(benchmark, LOCAL_SPEC) if isinstance(name, dict) else name


def size(n: float) -> str:
    """Bytes as MiB below 1 GiB (3 digits), else GiB with 2 decimals."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    mib = n / 2**20
    return f"{mib:.1f} MiB" if mib < 100 else f"{mib:.0f} MiB"


def seconds(t: float) -> str:
    return f"{t:.1f} s" if t >= 1 else f"{t * 1e3:.1f} ms"


def ratio(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}"


def shape_field(shape: str, name: str) -> str:
    return dict(part.split("=", 1) for part in shape.split())[name]


def short_shape(shape: str) -> str:
    """The shape without ``b=1`` and ``S``: the table's S column says the length."""
    return " ".join(p for p in shape.split() if p.split("=")[0] not in ("b", "S"))


def markdown(header: List[str], lines: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def _memory(m: Dict) -> Optional[float]:
    return m.get("above_floor_bytes")


def _reason(m: Dict) -> str:
    if m.get("oom"):
        return "out of memory"
    if m.get("skipped"):
        return "not run (out of memory at a shorter S)"
    if m.get("measured") is False:
        return f"not run (estimated peak {size(m['estimated_peak_bytes'])}, above the free memory)"
    return "-"


def comparison(rows: List[Dict], machine: str, benchmarks: List[str]) -> str:
    """MST against each baseline measured beside it: above-floor memory and median step time."""
    cases: Dict[tuple, Dict[str, Dict]] = {}
    for r in rows:
        if r["machine"] == machine and r["benchmark"] in benchmarks:
            cases.setdefault((benchmarks.index(r["benchmark"]), int(shape_field(r["shape"], "S")), r["shape"],
                              r["dtype"]), {})[r["variant"]] = r
    lines = []
    for (_, seq, shape, dtype), variants in sorted(cases.items()):
        mst = [v for v in variants if v.startswith("mst") and v != "mst-M1"]
        if len(mst) != 1:
            raise ValueError(f"{machine} {shape}: expected one MST variant, got {sorted(variants)}")
        m = variants[mst[0]]
        bench = m["benchmark"]
        chunks = mst[0].partition("M=")[2]
        what = WHAT[bench] + (f" (M = {chunks})" if chunks else "")
        for base in sorted(set(variants) - set(mst), key=lambda v: list(BASELINES).index(v.split(" M=")[0])):
            b = variants[base]
            bm, mm = b["metrics"], m["metrics"]
            mem_b, mem_m = _memory(bm), _memory(mm)
            cells = [what, f"{seq // 1024}K", short_shape(shape) + f", {dtype}", baseline_name(bench, base),
                     size(mem_b) if mem_b is not None else _reason(bm),
                     size(mem_m) if mem_m is not None else _reason(mm),
                     ratio(mem_m / mem_b) if mem_b and mem_m is not None else "-"]
            if "time_s" in bm and "time_s" in mm:
                cells += [seconds(bm["time_s"]), seconds(mm["time_s"]), ratio(mm["time_s"] / bm["time_s"])]
            else:
                cells += ["-", "-", "-"]
            lines.append(cells)
    return markdown(["what", "S", "shape", "MST against (baseline)", "baseline, above floor", "MST, above floor",
                     "memory MST / baseline", "baseline time", "MST time", "time MST / baseline"], lines)


def load_line(rows: List[Dict], machine: str, benchmarks: List[str]) -> str:
    """Where the table's numbers come from: versions, commits and the 1-minute load averages."""
    chosen = [r for r in rows if r["machine"] == machine and r["benchmark"] in benchmarks]
    loads = [r["provenance"]["load_average"] for r in chosen if r["provenance"].get("load_average") is not None]
    ones = [x[0] if isinstance(x, list) else x for x in loads]
    versions = sorted({f"torch {r['provenance']['torch']}, megatron-core {r['provenance']['megatron_core']}"
                       for r in chosen})
    commits = sorted({f"{r['provenance']['commit']} ({r['provenance']['date'][:10]})" for r in chosen})
    text = f"Rows from commits {', '.join(commits)}; {'; '.join(versions)}."
    if ones:
        span = f"{min(ones):.1f}" + (f" to {max(ones):.1f}" if max(ones) > min(ones) else "")
        text += f" 1-minute load average at the start: {span}."
    return text


def cpu_table(rows):
    benchmarks = ["mlp", "layer_full_recompute", "lm_head", "model_step"]
    return comparison(rows, DEVELOPERS_CPU, benchmarks) + "\n\n" + load_line(rows, DEVELOPERS_CPU, benchmarks)


STEP_VARIANTS = {"sdpa": SDPA + " (the baseline)", "mst": "MST",
                 "mst-full-mlp-recompute": "MST with the MLP computing in megatron's layer recompute (before)"}


def step_time_table(rows):
    """Interleaved whole-model step times on the developers' machine, MST against the SDPA baseline."""
    chosen = [r for r in rows if r["machine"] == DEVELOPERS_CPU and r["benchmark"] == "full_recompute_step"]
    lines = []
    for shape in sorted({r["shape"] for r in chosen}):
        by = {r["variant"]: r["metrics"] for r in chosen if r["shape"] == shape}
        for variant, label in STEP_VARIANTS.items():
            m, base = by[variant], by["sdpa"]
            lines.append([short_shape(shape), f"{int(shape_field(shape, 'S')) // 1024}K", label,
                          ", ".join(seconds(t) for t in m["times_s"]), seconds(m["time_s"]),
                          ", ".join(ratio(t / b) for t, b in zip(m["times_s"], base["times_s"])),
                          ratio(m["time_s"] / base["time_s"])])
    return (markdown(["shape", "S", "variant", "rounds", "median", "per round / baseline", "median / baseline"],
                     lines)
            + "\n\n" + load_line(rows, DEVELOPERS_CPU, ["full_recompute_step"]))


def xeon_table(rows):
    benchmarks = ["mlp", "layer_full_recompute"]
    cpu = []
    for r in rows:
        if r["machine"] == XEON and r["benchmark"] in benchmarks and r["variant"].startswith("mst M="):
            base = next(b for b in rows if b["machine"] == XEON and b["benchmark"] == r["benchmark"]
                        and b["shape"] == r["shape"] and b["variant"].startswith("mcore-chunks"))
            cpu.append(f"{WHAT[r['benchmark']]} {ratio(r['metrics']['cpu_time_s'] / base['metrics']['cpu_time_s'])}")
    return (comparison(rows, XEON, benchmarks) + "\n\n" + load_line(rows, XEON, benchmarks)
            + " CPU time of the process, MST / megatron-core's MLP chunks (steadier than wall time under that load): "
            + ", ".join(cpu) + ".")


def gpu_table(rows):
    benchmarks = ["cuda_lm_head", "cuda_mlp", "cuda_layer_full_recompute", "cuda_model_step"]
    return comparison(rows, H200, benchmarks) + "\n\n" + load_line(rows, H200, benchmarks)


def reach_points(rows) -> Dict[str, Dict[int, Dict]]:
    out: Dict[str, Dict[int, Dict]] = {}
    for r in rows:
        if r["machine"] == H200 and r["benchmark"] == "cuda_reach":
            out.setdefault(r["variant"], {})[int(shape_field(r["shape"], "S"))] = r["metrics"]
    return out


def reach_table(rows):
    points = reach_points(rows)
    cell = lambda m: "out of memory" if m is None or m.get("oom") else size(m["peak_bytes"])  # noqa: E731
    lines = [[f"{s // 1024}K", cell(points["sdpa"].get(s)), cell(points["mst"].get(s))]
             for s in sorted(set(points["sdpa"]) | set(points["mst"]))]
    return markdown(["S", f"{SDPA}: peak", "MST: peak"], lines) + "\n\n" + load_line(rows, H200, ["cuda_reach"])


def simulated_gpu_table(rows):
    """``sim_cuda_reach``: each H200 reach step's simulated peak beside the measured one."""
    chosen = sorted((r for r in rows if r["benchmark"] == "sim_cuda_reach"),
                    key=lambda r: (r["variant"] != "sdpa", int(shape_field(r["shape"], "S"))))
    name = {"sdpa": SDPA, "mst": "MST"}
    lines = []
    for r in chosen:
        m = r["metrics"]
        measured = m.get("gpu_peak_bytes")
        lines.append([f"{int(shape_field(r['shape'], 'S')) // 1024}K", name.get(r["variant"], r["variant"]),
                      size(m["simulated_peak_bytes"]), size(measured) if measured else "out of memory",
                      f"{m['rel_error']:+.1%}" if measured else "", seconds(m["seconds"])])
    return (markdown(["S", "model", "simulated peak", f"{H200}: measured", "error", "simulated in"], lines)
            + "\n\n" + load_line(rows, chosen[0]["machine"], ["sim_cuda_reach"]))


REACH_VARIANTS = ("stock, no recompute", "stock, full recompute", "MST", "MST + offload")


def sim_reach_points(rows) -> Dict[str, Dict[str, Dict[int, Dict]]]:
    """``sim_reach`` metrics by model, variant and GPU count."""
    out: Dict[str, Dict[str, Dict[int, Dict]]] = {}
    for r in rows:
        if r["benchmark"] == "sim_reach":
            model, gpus = (shape_field(r["shape"], k) for k in ("model", "GPUs"))
            out.setdefault(model, {}).setdefault(r["variant"], {})[int(gpus)] = r["metrics"]
    return out


def _reach_cell(m: Optional[Dict]) -> str:
    if m is None:
        return ""
    if not m["longest_seq"]:
        return "nothing fits"
    x = m["layout"]
    sizes = f"TP{x['tp']}" + (f" PP{x['pp']}" if x["pp"] > 1 else "") + (
        f" CP{x['cp']} {x['cp_comm_type']}" if x["cp"] > 1 else "")
    return f"{m['longest_seq'] // 1024:,}K ({sizes}{', Adam on host' if x['optimizer_cpu_offload'] else ''})"


def sim_reach_table(rows):
    """The longest fitting step by GPU count (``sim_reach``), one line per model and GPU count."""
    chosen = [r for r in rows if r["benchmark"] == "sim_reach"]
    if not chosen:
        return "(no sim_reach rows yet: python -m benchmarks.sim_reach)"
    points = sim_reach_points(chosen)
    lines = []
    for model in sorted(points):
        for gpus in sorted({g for v in points[model].values() for g in v}):
            lines.append([model, str(gpus)] + [_reach_cell(points[model].get(v, {}).get(gpus)) for v in REACH_VARIANTS])
    return (markdown(["model", "GPUs", *(f"{v}: longest S" for v in REACH_VARIANTS)], lines)
            + "\n\n" + load_line(rows, chosen[0]["machine"], ["sim_reach"]))


def flops_table(rows):
    chosen = [r for r in rows if r["benchmark"] == "flops_full_recompute"]
    by = {}
    for r in chosen:
        variant, attention, recompute = (p.strip() for p in r["variant"].split(","))
        by.setdefault((attention, recompute, r["shape"]), {})[variant] = r["metrics"]["flop"]
    lines = [[a.replace("attention ", ""), rc.replace("recompute ", ""),
              short_shape(shape) + f" S={shape_field(shape, 'S')}",
              f"{v['sdpa'] / 1e12:.1f}", f"{v['mst'] / 1e12:.1f}", ratio(v["mst"] / v["sdpa"])]
             for (a, rc, shape), v in sorted(by.items())]
    header = ["attention counted", "recompute", "shape", f"{SDPA}: TFLOP", "MST: TFLOP", "MST / baseline"]
    return markdown(header, lines)


def context_parallel_rows(rows) -> List[Dict]:
    """The ``context_parallel_step`` rows by world size, then TP, then exchange (the single rank first)."""
    chosen = [r for r in rows if r["benchmark"] == "context_parallel_step"]
    return sorted(chosen, key=lambda r: (r["metrics"]["world"], r["metrics"]["tp"],
                                         CP_COMM_TYPES.index(cp_comm_type(r["variant"]) or "a2a")))


def cp_comm_type(variant: str) -> Optional[str]:
    """The exchange a ``context_parallel_step`` variant names ("CP=4 p2p" -> "p2p"), None without CP."""
    return next((w for w in variant.split() if w in CP_COMM_TYPES), None)


def context_parallel_table(rows):
    chosen = context_parallel_rows(rows)
    single = next(r for r in chosen if r["metrics"]["world"] == 1)["metrics"]
    lines = []
    for r in chosen:
        m = r["metrics"]
        name = r["variant"] + (" + SP" if m["tp"] > 1 else "")
        act = m["act_bytes"] / single["act_bytes"]
        lines.append([name, size(m["peak_bytes"]), size(m["act_bytes"]), ratio(act), ratio(1 / m["world"]),
                      ratio(act * m["world"]), f"{m['longest_seq']} ({m['longest_seq'] / single['longest_seq']:.2f}x)"])
    seq = shape_field(chosen[0]["shape"], "S")
    return (markdown(["layout", f"per-rank peak at S={seq}", "act", "act / single rank's", "1/(TP x CP)",
                      "act / (1/(TP x CP))", f"longest S in {size(single['budget_bytes'])} per rank"], lines)
            + "\n\n" + load_line(rows, chosen[0]["machine"], ["context_parallel_step"]))


def lm_head_gemms_table(rows):
    chosen = [r for r in rows if r["benchmark"] == "lm_head_chunk_gemms"]
    lines = [[shape_field(r["shape"], "rows"), r["variant"],
              *(f"{r['metrics']['gflop_per_s'][k]:.0f}" for k in ("logits", "hidden_grad", "weight_grad")),
              seconds(r["metrics"]["chunk_s"])]
             for r in sorted(chosen, key=lambda r: (int(shape_field(r["shape"], "rows")), r["variant"]))]
    return markdown(["chunk tokens", "GEMMs over", "logits GFLOP/s", "hidden grad GFLOP/s", "weight grad GFLOP/s",
                     "the three GEMMs"], lines)


def cp_traffic_table(rows):
    chosen = [r for r in rows if r["benchmark"] == "cp_traffic"]
    order = {"a2a": 0, "p2p": 1, "a2a+p2p": 2}
    lines = [[r["variant"], size(r["metrics"]["sent_bytes"]), size(r["metrics"]["predicted_bytes"]),
              ratio(r["metrics"]["sent_bytes"] / r["metrics"]["predicted_bytes"])]
             for r in sorted(chosen, key=lambda r: (r["shape"], order.get(r["variant"], 3)))]
    return (markdown(["cp_comm_type", "sent per rank, forward + backward", "predicted", "sent / predicted"], lines)
            + "\n\n" + load_line(rows, chosen[0]["machine"], ["cp_traffic"]))


TABLES: Dict[str, Callable[[List[Dict]], str]] = {
    "cpu": cpu_table, "cpu-step-time": step_time_table, "xeon-mcore-chunks": xeon_table, "gpu": gpu_table, "gpu-reach": reach_table,
    "flops": flops_table, "context-parallel": context_parallel_table, "lm-head-gemms": lm_head_gemms_table,
    "cp-traffic": cp_traffic_table, "simulated-gpu": simulated_gpu_table, "reach": sim_reach_table,
}
MARKER = re.compile(r"<!-- table:([\w-]+) -->\n.*?<!-- /table:\1 -->", re.S)


def render(text: str, rows: List[Dict]) -> str:
    """``text`` with every marked table replaced by its rendering from ``rows``."""
    def table(match):
        name = match.group(1)
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r} in the README; known: {sorted(TABLES)}")
        return f"<!-- table:{name} -->\n{TABLES[name](rows)}\n<!-- /table:{name} -->"

    return MARKER.sub(table, text)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(rows: List[Dict], path: str = PLOT) -> None:
    """Peak memory of a 32-layer Llama-3-8B step on the H200 against S: the SDPA baseline and MST."""
    plt = _pyplot()

    points = reach_points(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, label in (("sdpa", SDPA.replace("`", "")), ("mst", "MST")):
        ok = sorted(s for s, m in points[variant].items() if not m.get("oom"))
        line, = ax.plot([s // 1024 for s in ok], [points[variant][s]["peak_bytes"] / 2**30 for s in ok], "o-",
                        label=label)
        for s in sorted(s for s, m in points[variant].items() if m.get("oom")):
            ax.plot([s // 1024], [H200_GIB], "x", color=line.get_color(), ms=10)
            ax.annotate("out of memory", (s // 1024, H200_GIB), xytext=(0, -12),
                        textcoords="offset points", ha="right", va="top", fontsize=8)
    ax.axhline(80e9 / 2**30, color="grey", ls="--", lw=1, label="80 GB card")
    ax.axhline(H200_GIB, color="black", ls=":", lw=1, label="the H200's memory")
    ax.set_ylim(0, 150)
    ax.set_xscale("log", base=2)
    ax.set_xticks([16, 32, 64, 128], ["16K", "32K", "64K", "128K"])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak GiB, one step (weights + grads, no optimizer)")
    ax.set_title("Llama-3-8B, bf16, full recompute, NVIDIA H200")
    ax.legend(loc="upper left", bbox_to_anchor=(0, 0.9), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_context_parallel(rows: List[Dict], path: str = CP_PLOT) -> None:
    """The longest S in a fixed per-rank budget against the ranks per sequence (``context_parallel_step``):
    one line per CP exchange, TP layouts as points, and the single rank's S times the rank count."""
    plt = _pyplot()
    chosen = context_parallel_rows(rows)
    single = chosen[0]["metrics"]
    worlds = sorted({r["metrics"]["world"] for r in chosen})
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(worlds, [w * single["longest_seq"] for w in worlds], ":", color="grey", label="single rank's S x ranks")
    for comm, marker in zip(CP_COMM_TYPES, "osD"):
        line = [r["metrics"] for r in chosen
                if r["metrics"]["world"] == 1 or (r["metrics"]["tp"] == 1 and cp_comm_type(r["variant"]) == comm)]
        if len(line) > 1:
            ax.plot([m["world"] for m in line], [m["longest_seq"] for m in line], marker + "-", label=f"CP {comm}")
    for r in chosen:
        if r["metrics"]["tp"] > 1:
            ax.plot([r["metrics"]["world"]], [r["metrics"]["longest_seq"]], "^", ms=8, label=r["variant"] + " + SP")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(worlds, [str(w) for w in worlds])
    ax.set_xlabel("ranks per sequence (TP x CP)")
    ax.set_ylabel("longest sequence (tokens)")
    ax.set_title(f"longest S in {size(single['budget_bytes'])} per rank ({short_shape(chosen[0]['shape'])}, fp32)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reach(rows: List[Dict], path: str = REACH_PLOT) -> None:
    """The longest fitting step against the GPU count (``sim_reach``): a line per model and variant."""
    plt = _pyplot()
    points = sim_reach_points(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, style in zip(sorted(points), ("-", "--")):
        for variant, marker in zip(REACH_VARIANTS, "vsoD"):
            line = sorted((g, m["longest_seq"]) for g, m in points[model].get(variant, {}).items() if m["longest_seq"])
            if line:
                ax.plot([g for g, _ in line], [s for _, s in line], marker + style, label=f"{model} {variant}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("GPUs (80 GB) per sequence")
    ax.set_ylabel("longest sequence (tokens)")
    ax.set_title("simulated full training step (bf16, Adam), longest S that fits", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the README's tables differ from the rows")
    p.add_argument("--merge", metavar="ROWS", help="first add the rows of this file to the results table")
    p.add_argument("--readme", default=README)
    p.add_argument("--rows", default=ROWS)
    args = p.parse_args(argv)
    if args.merge:
        write_rows(read_rows(args.merge), args.rows)
    rows = read_rows(args.rows)
    with open(args.readme) as f:
        text = f.read()
    new = render(text, rows)
    if args.check:
        if new != text:
            print(f"{args.readme}: tables differ from {args.rows}; run python -m benchmarks.tables", file=sys.stderr)
            return 1
        return 0
    with open(args.readme, "w") as f:
        f.write(new)
    plot(rows)
    plot_context_parallel(rows)
    plot_reach(rows)
    print(f"wrote {args.readme}, {PLOT}, {CP_PLOT} and {REACH_PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
