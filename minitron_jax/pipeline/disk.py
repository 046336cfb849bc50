"""How much disk a pipeline run writes, known from the configs before any stage runs.

A run that cannot fit should say so at its start, not after an hour of distillation (CI's first-run check once
ran out of ``/tmp`` at the sft stage's checkpoint). The models a run keeps have exact sizes: parameters times the
bytes each is stored in. So the sum of what the run will hold at its end is a floor: tokenizers, logs, the token
cache, the evaluation outputs and the teacher-logit cache (whose exact size its own stage checks before the
teacher pass) are left out, as are puzzle students (their size is what the search finds). A run whose floor does
not fit in the free space plus what its directory holds already cannot finish, and is refused (exit 6).

The peak adds a trainer stage's checkpoints: fp32 parameters and both Adam moments (12 bytes a parameter), two of
them for a moment while a save replaces the last one, for the largest trainer stage (all of them with
``keep_checkpoints``). The peak is an upper estimate (it adds every later output too), so exceeding it is only
warned about."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from minitron_jax import fsutil
from minitron_jax.exitcodes import SystemRefusedError
from minitron_jax.fsutil import fmt_bytes, tree_bytes

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# Orbax checkpoint of a trainer run: fp32 parameters + Adam's first and second moments (train/checkpoints).
CHECKPOINT_BYTES_PER_PARAM = 12


@dataclasses.dataclass(frozen=True)
class DiskPlan:
    """``items``: (what, bytes) of each model the run keeps at its end; ``checkpoint``: the bytes a trainer stage's
    checkpoints take on top, at the most, while it trains."""

    items: tuple[tuple[str, int], ...]
    checkpoint: int

    @property
    def end(self) -> int:
        return sum(n for _, n in self.items)

    @property
    def peak(self) -> int:
        return self.end + self.checkpoint


def gguf_bytes_per_param(quant: str) -> float:
    """Bytes a parameter of the 2-D weights takes in a GGUF of ``quant`` (gguf's block sizes; the 1-D norms stay
    f32, a few thousand parameters)."""
    import gguf

    from minitron_jax.convert.gguf_export import QUANT_TYPES

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[QUANT_TYPES[quant][0]]]
    return size / block


def hf_itemsize(path: str | Path) -> int:
    """Bytes a parameter takes in an HF directory, from its config.json's dtype; 2 (the least a float checkpoint
    uses) where it names none, so that the floor stays a floor."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return 2
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "")
    return ITEMSIZE.get(name, 2)


def disk_plan(pc, teacher_params: int, teacher_itemsize: int, teacher_is_copied: bool,
              student_params: Mapping[str, int]) -> DiskPlan:
    """The models the run described by ``pc`` keeps and its largest checkpoint. ``teacher_itemsize``: the bytes a
    teacher parameter takes as the stages read it (4 for a GGUF teacher, read as fp32); ``teacher_is_copied``: the
    teacher is not an HF directory and the teacher stage writes it as one; ``student_params``: the parameters of
    each pruned student (puzzle students absent)."""
    out = ITEMSIZE[pc.export_dtype]
    items: list[tuple[str, int]] = []
    trainers: list[int] = []
    source = teacher_itemsize
    if teacher_is_copied:
        items.append(("teacher", teacher_params * teacher_itemsize))
    if pc.teacher_correction.enabled:
        items.append(("correction", teacher_params * out))
        trainers.append(teacher_params)
        source = out  # the students are pruned from the corrected teacher's export
    sft = set(pc.sft_students)
    for s, n in student_params.items():
        items.append((f"prune.{s}", n * source))
        items.append((f"distill.{s}", n * out))
        trainers.append(n)
        if s in sft:
            items.append((f"sft.{s}", n * out))
            trainers.append(n)
        if pc.export.enabled:
            items.append((f"export.{s}", n * out))
            if pc.export.gguf is not None:
                items.append((f"export.{s} gguf", int(n * gguf_bytes_per_param(pc.export.gguf))))
    if not trainers:
        checkpoint = 0
    elif pc.keep_checkpoints:  # each stage keeps its last one, and holds a second while replacing it
        checkpoint = CHECKPOINT_BYTES_PER_PARAM * (sum(trainers) + max(trainers))
    else:
        checkpoint = CHECKPOINT_BYTES_PER_PARAM * 2 * max(trainers)
    return DiskPlan(tuple(items), checkpoint)


def check_disk(plan: DiskPlan, run_dir: Path) -> dict[str, Any]:
    """Refuse (SystemRefusedError, exit 6) a run whose floor does not fit: more than the free space on
    ``run_dir``'s file system plus what ``run_dir`` holds already. Returns the numbers for the caller's report
    (``short``: the peak does not fit, a warning)."""
    free = fsutil.free_bytes(run_dir)  # through the module: a test stands in for the disk there
    held = tree_bytes(run_dir)  # what a rerun finds already written, and replaces or keeps
    room = free + held
    if plan.end > room:
        biggest = ", ".join(f"{what} {fmt_bytes(n)}" for what, n in sorted(plan.items, key=lambda x: -x[1])[:3])
        raise SystemRefusedError(
            f"{run_dir}: this run's models need at least {fmt_bytes(plan.end)} on disk at its end ({biggest}, ...) "
            f"and {fmt_bytes(free)} is free" + (f" (the run directory holds {fmt_bytes(held)})" if held else "")
            + "; free some space, choose a run_dir on a larger disk, or prune fewer students")
    return {"end": plan.end, "peak": plan.peak, "free": free, "held": held, "short": plan.peak > room}
