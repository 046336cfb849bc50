"""tools/gpu_check.sh's report (tools/gpu_report.py) on hand-made piece outputs: every piece reported, failures
named with their exit code, the numbers in the tables; and the script itself is valid bash that writes at most the
three files the device tool brings back."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from utils import load_tool

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def R():
    return load_tool("gpu_report")


def _step(tok_s, mfu):
    return {"seconds_per_step": 32768 / tok_s, "tokens_per_s": tok_s, "first_step_s": 40.0, "tflops_per_s": 400.0,
            "mfu": mfu, "loss": 3.0}


def _pieces(tmp_path: Path) -> Path:
    d = tmp_path / "pieces"
    d.mkdir()
    forward = {"env": {"model": "L=16 D=2048", "dtype": "bfloat16", "jax": "0.11.2", "jax_device": "cuda:0",
                       "torch": "2.11.0", "torch_device": "cuda:0", "torch_attn": "sdpa"},
               "results": [{"batch": 8, "seq_len": 2048, "ours_tok_s": 250000.0, "torch_tok_s": 200000.0,
                            "ratio": 1.25, "max_abs_logit_diff": 0.03}]}
    profile = {"source": "device", "events": 4210, "sum_ms": 1100.0, "busy_ms": 1020.0, "wall_ms": 1090.0,
               "busy_over_wall": 0.936, "categories": {"matmul": {"ms": 700.0, "share": 0.6364},
                                                       "attention": {"ms": 250.0, "share": 0.2273}},
               "top": [{"name": "sm90_xmma_gemm_bf16", "ms": 640.0, "count": 300, "share": 0.5818}]}
    distill = {"device": "1 x NVIDIA H200", "batch": 8, "seq_len": 4096, "remat": "full", "teacher": "T",
               "student": "S", "distill": {**_step(30000.0, 0.51), "profile": profile},
               "ce_only": _step(45000.0, 0.55), "distill_cached": {**_step(42000.0, 0.57), "top_k": 64}}
    plan = {"compile": {"backend": "cuda", "device_kind": "NVIDIA H200", "compile_seconds": 30.0},
            "memory_per_device": {"compiled": {"params": 18e9, "optimizer": 36e9, "teacher": 16e9, "temp": 20e9},
                                  "total": 90e9}, "fits": True}
    err = {"out": 0.004, "dq": 0.006, "dk": 0.005, "dv": 0.003}
    attention = {"device": "cuda:0", "dtype": "bfloat16", "fused_uses_cudnn": True,
                 "check": {"shape": "2 x 512, 32 heads / 8 kv, head_dim 64", "documents_per_row": [4, 3],
                           "impls": {"einsum": {"leak": 0.0, "error": err}, "fused": {"leak": 0.25, "error": err}}},
                 "time": {"shape": "4 x 4096", "impls": {"einsum": {"ms": 21.5, "tokens_per_s": 762000.0},
                                                         "fused": {"error": "XlaRuntimeError: RESOURCE_EXHAUSTED"}}}}
    lighter = {**distill, "remat": "none", "distill": _step(40000.0, 0.62)}
    lighter.pop("distill_cached")
    for name, result, rc in (("forward_bf16", forward, 0), ("attention", attention, 0), ("distill", distill, 0),
                             ("distill_remat_none", lighter, 0), ("plan8b_gpu", plan, 0)):
        (d / f"{name}.json").write_text(json.dumps(result))
        (d / f"{name}.rc").write_text(f"{rc}\n")
    (d / "plan8b_cpu.json").write_text("Traceback (most recent call last): ...")  # a crashed piece
    (d / "plan8b_cpu.rc").write_text("1\n")
    (d / "distill_remat_dots.json").write_text("")  # out of memory: nothing on stdout
    (d / "distill_remat_dots.rc").write_text("1\n")
    return d


def test_report_tables_and_failures(R, tmp_path, capsys):
    d = _pieces(tmp_path)
    assert R.main([str(d), "--json", str(tmp_path / "all.json")]) == 0
    md = capsys.readouterr().out
    assert "| 8 × 2048 | 250,000 | 200,000 | 1.25 | 3.00e-02 |" in md
    assert "| distill, online teacher | full |" in md and "51.0%" in md
    assert "| distill, cached top-64 teacher | full |" in md and "57.0%" in md
    assert "| distill, online teacher | none |" in md and "62.0%" in md  # the lighter-remat piece
    assert "| distill_remat_dots | no result (exit 1) |" in md
    assert "| cuda | NVIDIA H200 | 30.0 | 18.00 | 36.00 | 16.00 | 20.00 | 90.00 | True |" in md
    assert "| plan8b_cpu | no result (exit 1) |" in md  # a failed piece is named, never dropped
    assert "plan8b_cpu 1" in md
    assert "| einsum | 0 | 4.0e-03, 6.0e-03, 5.0e-03, 3.0e-03 | 21.50 | 762,000 |" in md
    assert "| fused | **2.5e-01** |" in md and "XlaRuntimeError: RESOURCE_EXHAUSTED | — |" in md  # a leak stands out
    assert "1090.0 ms wall, 1020.0 ms with ops running (94%)" in md  # the traced step of the distill piece
    assert "| matmul | 700.0 | 63.6% |" in md and "| `sm90_xmma_gemm_bf16` | 640.0 | 300 | 58.2% |" in md
    everything = json.loads((tmp_path / "all.json").read_text())
    assert everything["plan8b_cpu"]["rc"] == 1 and "Traceback" in everything["plan8b_cpu"]["result"]["raw"]
    assert everything["distill"]["result"]["distill_cached"]["top_k"] == 64


def test_report_of_pieces_never_run(R, tmp_path, capsys):
    empty = tmp_path / "none"
    empty.mkdir()
    assert R.main([str(empty)]) == 0
    md = capsys.readouterr().out
    assert "forward: no result (exit None)" in md and "attention check: no result (exit None)" in md
    assert ("distillation step: no result (exit codes: distill None, distill_remat_none None, "
            "distill_remat_dots None)") in md


def test_script_is_valid_bash_and_names_three_outputs():
    script = (REPO / "tools" / "gpu_check.sh").read_text()
    subprocess.run(["bash", "-n", str(REPO / "tools" / "gpu_check.sh")], check=True)
    outputs = {name for name in ("gpu_check.json", "gpu_check.md", "gpu_check.log") if f"$OUT_DIR/{name}" in script}
    assert len(outputs) == 3
    # those three, the .md twice (written, then printed); the pieces go to a temporary directory
    assert script.count('"$OUT_DIR/') == 4


def test_without_an_accelerator_the_script_stops_at_once_with_one_line(tmp_path):
    """On a CPU-only jax the full-size pieces can only time out or fail (they ran 279 s here for no result): the
    script refuses in seconds, exit 2, naming the backend and the smoke mode, and leaves the reason in its log."""
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("an accelerator is present")
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "GPU_CHECK_SMOKE": "0"})
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: tools/gpu_check.sh: jax sees no accelerator (default "
                                               "backend: cpu)") and "GPU_CHECK_SMOKE=1" in err[0], err
    assert err[0] in (tmp_path / "gpu_check.log").read_text()
    assert not (tmp_path / "gpu_check.md").exists()
