"""The comparison tools in tools/ (bench_vs_torch, bench_forward, profile_kd_step, hf_vs_ours) where torch is not
installed, as after the README's ``pip install -e .``: one line and exit 2 before any timing. bench_vs_torch used to
time our side for minutes and only then fail on ``import torch`` with a traceback. And the benchmarks' numeric
options: a count or length out of range is the argument parser's one-line error (exit 2), not a traceback later or
a silent default."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Run a tool as a script (tools/ first on sys.path, as `python tools/X.py` has it) with `import torch` blocked.
RUN_WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.path.insert(0, {tools!r}); "
                     "sys.argv = [{script!r}, *{args!r}]; runpy.run_path({script!r}, run_name='__main__')")


@pytest.mark.parametrize("tool,args,hint", [("bench_vs_torch", [], ""),
                                            ("bench_forward", [], " (or --no-torch: ours only)"),
                                            ("profile_kd_step", [], " (or --no-torch: ours only)"),
                                            ("hf_vs_ours", ["some/dir"], "")])
def test_a_tool_that_needs_torch_says_so_at_once(tool, args, hint):
    script = str(REPO / "tools" / f"{tool}.py")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TORCH.format(tools=str(REPO / "tools"), script=script,
                                                                          args=args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: tools/{tool}.py compares with transformers + torch, and torch is not "
                                   f"installed here: pip install -e '.[test]'{hint}")
    assert proc.stdout == "" and time.perf_counter() - t0 < 60  # nothing timed, nothing loaded


@pytest.mark.parametrize("tool,args,message", [
    ("bench_distill", ["--steps", "0"], "argument --steps: must be >= 1, got 0"),  # was a StatisticsError traceback
    ("bench_distill", ["--batch", "0"], "argument --batch: must be >= 1, got 0"),  # was the default batch, silently
    ("bench_distill", ["--cached-teacher", "0"], "argument --cached-teacher: must be >= 1, got 0"),  # was skipped
    ("bench_distill", ["--seq-len", "1"], "argument --seq-len: must be >= 2, got 1"),  # was a RunConfigError trace
    ("bench_vs_torch", ["--steps", "x"], "argument --steps: expected an integer >= 1, got 'x'"),
    ("bench_forward", ["--seq-len", "256", "0"], "argument --seq-len: must be >= 2, got 0"),
    ("profile_kd_step", ["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
])
def test_bad_numbers_are_refused_by_the_argument_parser(tool, args, message):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"{tool}.py: error: {message}"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
