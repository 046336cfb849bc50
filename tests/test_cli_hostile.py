"""Hostile input across every command, as a user meets it: each case must end with the documented exit code and
one ``error:`` line on stderr — no traceback, no stdout result — and leave nothing behind.

The deeper cases of each class have their own files (test_untrusted_headers, test_fsutil, test_train_faults,
test_data); this one walks the commands, so a new command or a new code path cannot skip the contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from utils import save_tiny_hf, tiny_tokenizer

from minitron_jax.exitcodes import ExitCode


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    model = save_tiny_hf(root / "model", tokenizer=tiny_tokenizer())
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(b"ok\n\xff\xfe\x00binary")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (root / "fake.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    (root / "notes.yaml").write_text("just: [unclosed\n")
    (root / "afile").write_text("x")
    hetero_model = _save_tiny_hetero(root / "hetero", model)
    return {"root": root, "model": model, "hetero": hetero_model,
            **{p.stem: p for p in root.iterdir() if p.is_file()}}


def _save_tiny_hetero(path: Path, uniform: Path) -> Path:
    """A heterogeneous (DeciLM) model with the tiny model's shared sizes and tokenizer: what the commands that
    only take a uniform model must refuse in one line."""
    import jax

    from minitron_jax import hetero
    from minitron_jax.blocks import BlockSpec
    from minitron_jax.convert import load_model, save_hf

    m = load_model(uniform)
    hcfg = hetero.HeteroConfig(m.config, (BlockSpec.parse("gqa1/mlp256"), BlockSpec.parse("none/mlp256")))
    save_hf(path, hcfg, hetero.init_params(hcfg, jax.random.PRNGKey(0)), tokenizer=m.tokenizer)
    return path


def _cases(w: dict[str, Path]) -> list[tuple[str, list[str], int, str]]:
    r, m, h = w["root"], str(w["model"]), str(w["hetero"])
    return [
        # (command, argv, exit code, a word the message must contain)
        ("eval", ["--model", str(r / "nope"), "--text", str(w["text"]), "--seq-len", "8"], 2, "nope"),
        ("eval", ["--model", m, "--text", str(w["binary"]), "--seq-len", "8"], 2, "not UTF-8"),
        ("eval", ["--model", m, "--text", str(w["empty"]), "--seq-len", "8"], 2, "empty.txt"),
        ("eval", ["--model", m, "--text", str(w["text"]), "--seq-len", "1"], 2, "--seq-len"),
        ("eval", ["--model", str(w["fake"]), "--text", str(w["text"]), "--seq-len", "8"], 2, "fake.gguf"),
        ("eval", ["--model", m, "--text", str(w["bad"]), "--seq-len", "8"], 2, "bad.jsonl:2"),
        ("mmlu", ["--model", m, "--data", str(w["bad"]), "--limit", "2"], 2, "bad.jsonl"),
        ("mmlu", ["--model", m, "--data", str(r / "nope.jsonl")], 2, "nope.jsonl"),
        ("convert", [str(w["fake"]), str(r / "out_fake")], 2, "fake.gguf"),
        ("convert", [m, str(r)], 2, "source"),
        ("convert", [m, str(w["model"] / "inner")], 2, "source"),
        ("convert", [m, str(r / "out_shard"), "--max-shard-size", "-1"], 2, "--max-shard-size"),
        ("convert", [m, str(w["afile"]), "--overwrite"], 2, "afile"),
        ("prune", ["--model", m, "--calib", str(w["text"]), "--out", str(r / "p1"), "--hidden", "1000"], 2, "hidden"),
        ("prune", ["--model", m, "--calib", str(w["binary"]), "--out", str(r / "p2"), "--ffn", "32"], 2, "UTF-8"),
        ("prune", ["--model", m, "--calib", str(w["text"]), "--out", m, "--ffn", "32", "--overwrite"], 2, "source"),
        ("prune", ["--config", str(w["notes"])], 2, "notes.yaml"),
        ("distill", ["--config", str(w["notes"])], 2, "notes.yaml"),
        ("distill", ["--config", str(r / "nope.yaml")], 2, "nope.yaml"),
        ("distill", ["--export-from", str(r / "norun"), "--out", str(r / "exp")], 2, "norun"),
        ("pipeline", ["--config", str(w["notes"])], 2, "notes.yaml"),
        ("nas", ["--model", m, "--target-params", "-5"], 2, "target"),
        # Heterogeneous models where only a uniform one can go; the layer-by-layer search's own refusals.
        # (prune takes --hidden and the depth options of a heterogeneous model: tests/test_hetero_importance.py)
        ("prune", ["--model", h, "--calib", str(w["text"]), "--out", str(r / "p3"), "--ffn", "32"], 2,
         "heterogeneous"),
        ("nas", ["--model", h, "--target-params", "1000"], 2, "heterogeneous"),
        ("puzzle", ["--parent", h, "--out", str(r / "z1"), "--target-params", "1e9"], 2, "heterogeneous"),
        # (--runtime any: the tiny model's FFN of 96 is no width DeciLM, hence vLLM or llama.cpp, can hold)
        ("puzzle", ["--parent", m, "--out", str(r / "z2"), "--target-params", "10", "--runtime", "any"], 2, "target"),
        ("puzzle", ["--parent", m, "--out", str(r / "z5"), "--target-params", "1e9"], 2, "llama.cpp"),
        ("puzzle", ["--parent", m, "--out", str(r / "z3"), "--target-params", "1e9", "--attention", "gqa5"], 2,
         "gqa5"),
        ("puzzle", ["--parent", m, "--out", str(r / "z4")], 2, "target"),
        # --accelerator prices a latency/throughput target (nothing else); an unknown one and an unreachable
        # decode-step latency are refused before any work
        ("puzzle", ["--parent", m, "--out", str(r / "z6"), "--target-params", "1e9", "--runtime", "any",
                    "--accelerator", "h100"], 2, "--target-latency"),
        ("puzzle", ["--parent", m, "--out", str(r / "z7"), "--target-latency", "1", "--runtime", "any",
                    "--accelerator", "tpu-v9"], 2, "tpu-v9"),
        ("puzzle", ["--parent", m, "--out", str(r / "z8"), "--target-latency", "1e-9", "--runtime", "any",
                    "--accelerator", "h100"], 2, "target-latency"),
    ]


def _main(command: str):
    import importlib

    module = {"convert": "minitron_jax.cli.convert", "pipeline": "minitron_jax.cli.pipeline"}.get(
        command, f"minitron_jax.{command}")
    return importlib.import_module(module).main


def _case_ids():
    return [f"{i:02d}" for i in range(N_CASES)]


N_CASES = 32


@pytest.mark.parametrize("index", range(N_CASES), ids=_case_ids())
def test_hostile_case(world, index, capsys):
    command, argv, code, word = _cases(world)[index]
    before = sorted(p.name for p in world["root"].iterdir())
    model_files = sorted(p.name for p in world["model"].iterdir())
    rc = _main(command)(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == code, (command, argv, err)
    assert lines and lines[-1].startswith("error: "), err
    assert "Traceback" not in err, err
    assert word.lower() in lines[-1].lower(), (word, lines[-1])
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    try:  # a result on stdout would be taken for one
        json.loads(out)
        pytest.fail(f"a failed command printed a JSON result: {out!r}")
    except json.JSONDecodeError:
        pass
    assert sorted(p.name for p in world["root"].iterdir()) == before, "a failed command left files behind"
    assert sorted(p.name for p in world["model"].iterdir()) == model_files, "the input model was touched"


def test_case_table_is_complete(world):
    assert len(_cases(world)) == N_CASES
    assert {c for c, *_ in _cases(world)} == {"eval", "mmlu", "convert", "prune", "distill", "pipeline", "nas",
                                             "puzzle"}
    assert all(code in {int(c) for c in ExitCode} for _, _, code, _ in _cases(world))
