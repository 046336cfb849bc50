"""The notebooks run headless (nbclient) at tiny budgets (``MINITRON_NOTEBOOK_FAST=1``), in order, sharing a work
directory: on a tiny random model by default, on the embedded SmolLM2 with ``-m slow``. Their outputs stay cleared
in git."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_convert_and_inspect", "02_importance_and_pruning", "03_distillation"]


def _execute_all(model: str, work: Path, monkeypatch) -> dict[str, nbformat.NotebookNode]:
    from nbclient import NotebookClient

    monkeypatch.setenv("MINITRON_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MINITRON_NOTEBOOK_MODEL", model)
    monkeypatch.setenv("MINITRON_NOTEBOOK_DIR", str(work))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the figures
    # The kernel sees the machine's real devices, not the 8 fake ones of conftest.
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOKS.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = {}
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
        done[name] = nb
    return done


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or "".join(str(v) for k, v in o.get("data", {}).items()
                                                      if k.startswith("text/")))
    return "\n".join(out)


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for cell in nb.cells for o in cell.get("outputs", []))


def test_outputs_are_cleared_in_git():
    for name in NAMES:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs left in a cell"


def test_notebooks_run_on_a_tiny_model(tmp_path, monkeypatch, smollm2_assets):
    from utils import save_tiny_hf, tiny_tokenizer

    model = save_tiny_hf(tmp_path / "tiny", tokenizer=tiny_tokenizer(), max_position_embeddings=512)
    done = _execute_all(str(model), tmp_path / "work", monkeypatch)
    assert "bit-exact round trip: True" in _text(done["01_convert_and_inspect"])
    assert "held-out perplexity" in _text(done["01_convert_and_inspect"])
    assert _images(done["02_importance_and_pruning"]) >= 3
    assert "done: 6 steps" in _text(done["03_distillation"])
    assert _images(done["03_distillation"]) >= 1
    for name in ("teacher_hf", "width_hf", "depth_hf", "distill/hf"):
        assert (tmp_path / "work" / name / "config.json").is_file(), name


@pytest.mark.slow
def test_notebooks_run_on_smollm2(tmp_path, monkeypatch, smollm2_assets):
    done = _execute_all("asset:smollm2_gguf", tmp_path / "work", monkeypatch)
    assert "bit-exact round trip: True" in _text(done["01_convert_and_inspect"])
    assert "done: 6 steps" in _text(done["03_distillation"])
