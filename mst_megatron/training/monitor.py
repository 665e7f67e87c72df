"""What a long run reports: per-step and validation log lines, a terminal progress bar, a loss plot
(PNG + JSON) and TensorBoard scalars when installed. The last rank reports; the peak memory in a log
line is the maximum over ranks (CUDA allocations on GPU, peak RSS on CPU; the line names which).
"""

import json
import math
import os
import resource
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist


def peak_memory_bytes() -> int:
    """This process's peak: CUDA allocations on GPU, resident set size (RSS) on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_memory_label() -> str:
    return "peak CUDA alloc" if torch.cuda.is_available() else "peak RSS"


def max_over_ranks(value: float) -> float:
    """All ranks call this; each gets the largest ``value`` of any rank."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _format_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Monitor:
    """Report sink of the training loop; inert on every rank but the reporting one."""

    def __init__(self, train_iters: int, enabled: bool, tensorboard_dir: Optional[str] = None,
                 tokens_per_step: int = 1):
        self.train_iters = train_iters
        self.enabled = enabled
        self.tokens_per_step = tokens_per_step
        self.history = {"train": [], "valid": []}  # [tokens, loss] points
        self.bar = enabled and sys.stdout.isatty()
        self.start = time.time()
        self.writer = None
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.print(f"tensorboard is not installed: --tensorboard-dir {tensorboard_dir} ignored "
                           "(pip install tensorboard)")
            else:
                self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar:
            sys.stdout.write("\r\033[K")  # clear the bar; it is redrawn after the line
        print(line, flush=True)

    def progress(self, iteration: int, start_iteration: int) -> None:
        """Redraw the progress bar (terminal only)."""
        if not self.bar:
            return
        done = iteration / self.train_iters
        width = 30
        filled = int(width * done)
        elapsed = time.time() - self.start
        steps = iteration - start_iteration
        eta = elapsed / steps * (self.train_iters - iteration) if steps else 0.0
        sys.stdout.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {iteration}/{self.train_iters} "
            f"{100 * done:5.1f}% elapsed {_format_seconds(elapsed)} eta {_format_seconds(eta)}"
        )
        sys.stdout.flush()

    def step(self, iteration: int, loss: float, lr: float, grad_norm: Optional[float], tokens_per_s: float,
             step_s: float, peak_bytes: float) -> None:
        """One training-step line (and TensorBoard scalars)."""
        norm = "n/a" if grad_norm is None else f"{grad_norm:.4f}"
        self.print(
            f"iter {iteration:>7d}/{self.train_iters} | loss {loss:.7f} | lr {lr:.3e} | grad norm {norm} | "
            f"{tokens_per_s:,.0f} tokens/s | {step_s * 1e3:,.0f} ms/step | "
            f"{peak_memory_label()} {peak_bytes / 2**20:,.1f} MiB (max over ranks)"
        )
        self.history["train"].append([iteration * self.tokens_per_step, loss])
        if self.writer is not None:
            for name, value in (("train/loss", loss), ("train/lr", lr), ("train/grad_norm", grad_norm),
                                ("perf/tokens_per_s", tokens_per_s), ("perf/peak_memory_mib", peak_bytes / 2**20)):
                if value is not None:
                    self.writer.add_scalar(name, value, iteration)

    def validation(self, iteration: int, loss: float) -> None:
        """One validation line: loss and perplexity."""
        ppl = math.exp(min(loss, 50.0))
        self.print(f"validation at iter {iteration} | val loss {loss:.7f} | val ppl {ppl:,.3f}")
        self.history["valid"].append([iteration * self.tokens_per_step, loss])
        if self.writer is not None:
            self.writer.add_scalar("valid/loss", loss, iteration)
            self.writer.add_scalar("valid/ppl", ppl, iteration)

    def plot(self, folder: str) -> None:
        """Write ``loss.png`` (training and validation loss against tokens) and the points it shows,
        ``loss.json``, into ``folder``."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "loss.json"), "w") as f:
            json.dump({"tokens_per_step": self.tokens_per_step, **self.history}, f)
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, style in (("train", "-"), ("valid", "o-")):
            points = self.history[name]
            if points:
                ax.plot([t for t, _ in points], [v for _, v in points], style, label=f"{name} loss", markersize=3)
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "loss.png"), dpi=110)
        plt.close(fig)

    def close(self) -> None:
        if self.bar:
            sys.stdout.write("\n")
        if self.writer is not None:
            self.writer.close()
