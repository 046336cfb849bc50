"""What a run reports: FLOPs and MFU, a progress bar, ``metrics.jsonl`` and TensorBoard events.

FLOPs follow the PaLM appendix convention (matmuls only, no rematerialization, causal attention counted in full):
a forward pass costs ``2·N + 4·L·H·Hd·T`` per token, with N the parameters that take part in matmuls (everything
but the input embedding; a tied embedding is the lm_head and counts) and T the sequence length; training costs
three forward passes. A distillation step is therefore ``6·N_student + 2·N_teacher`` per token plus attention.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax

from minitron_jax.arch import AnyConfig, attention_layers, count_params
from minitron_jax.exitcodes import finite_or_none

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s per chip, by a substring of ``device.device_kind``. Checked in order (v5p before v5).
PEAK_FLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def matmul_params(config: AnyConfig) -> int:
    embed = config.vocab_size * config.hidden_size
    return count_params(config) - (0 if config.tie_word_embeddings else embed)


def forward_flops_per_token(config: AnyConfig, seq_len: int) -> float:
    # Only layers with (GQA) attention have the T-long score and value matmuls; linear/no-op ones are in N.
    attention = 4 * attention_layers(config) * config.num_heads * config.head_dim * seq_len
    return 2.0 * matmul_params(config) + attention


def step_flops_per_token(student: AnyConfig, teacher: AnyConfig | None, seq_len: int) -> float:
    """Training FLOPs of the student (3 forward passes) plus the teacher's forward pass, per token."""
    flops = 3.0 * forward_flops_per_token(student, seq_len)
    if teacher is not None:
        flops += forward_flops_per_token(teacher, seq_len)
    return flops


def peak_flops(devices: list | None = None) -> float | None:
    """Total peak bf16 FLOP/s of ``devices`` (default: all), or None when the kind is unknown (e.g. CPU)."""
    devices = devices if devices is not None else jax.devices()
    kind = devices[0].device_kind
    for name, flops in PEAK_FLOPS_BF16:
        if name.lower() in kind.lower():
            return flops * len(devices)
    return None


class Reporter:
    """Step and validation metrics to a progress bar (process 0), ``metrics.jsonl`` and TensorBoard."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, flops_per_token: float,
                 devices: list | None = None, progress: bool = True, tensorboard: bool = True, log_every: int = 1,
                 enabled: bool = True):
        self.enabled = enabled
        self.log_every = log_every
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(devices)
        self.total_steps, self.start_step = total_steps, start_step
        self._tokens_per_s: float | None = None
        self._progress = self._task = self._writer = self._jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # Steps past the checkpoint we start from ran before a crash and are about to run again: drop their lines
        # so every step is logged once. (TensorBoard event files cannot be cut; TensorBoard itself shows the
        # re-run steps over the old ones, by wall time.)
        truncate_metrics(run_dir / METRICS_FILE, start_step)
        self._jsonl = open(run_dir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tb"))
        from rich.console import Console

        self.console = Console(stderr=False)
        if progress and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                                      console=self.console)
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text, highlight=False)
        else:
            print(text, flush=True)

    def step(self, step: int, metrics: dict[str, float], *, seconds: float, tokens: int, compiled: bool) -> None:
        """Record step ``step`` (1-based: updates done). ``compiled`` marks a step that included compilation,
        which is kept out of the throughput average."""
        if not self.enabled:
            return
        if not compiled and seconds > 0:
            rate = tokens / seconds
            self._tokens_per_s = rate if self._tokens_per_s is None else 0.8 * self._tokens_per_s + 0.2 * rate
        record = {"step": step, **metrics, "step_seconds": seconds}
        if self._tokens_per_s is not None:
            record["tokens_per_s"] = self._tokens_per_s
            if self.peak:
                record["mfu"] = self._tokens_per_s * self.flops_per_token / self.peak
        self._write(record, prefix="train")
        stats = f"loss {metrics['loss']:.4f}"
        if self._tokens_per_s is not None:
            stats += f"  {self._tokens_per_s:,.0f} tok/s"
            stats += f"  MFU {record['mfu']:.1%}" if "mfu" in record else "  MFU n/a"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        elif step % self.log_every == 0 or step == self.total_steps:
            extras = "  ".join(f"{k} {metrics[k]:.4g}" for k in ("kd", "ce", "hidden", "grad_norm", "lr")
                               if k in metrics)
            print(f"step {step}/{self.total_steps}  {stats}  {extras}", flush=True)

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **metrics}, prefix="val")
        self.print("validation @ step %d: %s" % (step, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())))

    def _write(self, record: dict[str, Any], prefix: str) -> None:
        # Strict JSON: a value that could not be computed is null (the loop never logs a step it refused).
        line = json.dumps(finite_or_none({"kind": prefix, **record, "time": time.time()}), allow_nan=False)
        self._jsonl.write(line + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
        sys.stdout.flush()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of ``path`` (a ``metrics.jsonl``) with ``step <= last_step``, and drop lines that do
    not parse (one cut short by a kill). Rewritten to a temporary file and renamed: the old or the new log, whole."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            keep.append(line)
    if len(keep) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(run_dir: str | Path, kind: str = "train") -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` of one kind ("train" or "val"), in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == kind]
