"""The distillation trainer on tiny random models (CPU, 8 fake devices from conftest).

Covers: config errors, vocabulary checks, the jitted step (sharded ≡ single device, chunked ≡ naive gradients,
accumulation ≡ one big batch, dry-run lowering on abstract inputs), exact resume, NaN handling, the three modes
and HF export. The SIGKILL and real-SmolLM2 tests are in test_distill_slow.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from utils import _CORPUS, persistent_compile_cache, poison_hf, tiny_distill_files, tiny_tokenizer

from minitron_jax.config import LlamaConfig
from minitron_jax.convert.hf import save_hf
from minitron_jax.data import complete_rows
from minitron_jax.model import init_params
from minitron_jax.sharding import make_mesh
from minitron_jax.train.config import RunConfigError, load_config
from minitron_jax.train.loop import NonFiniteLossError, run
from minitron_jax.train.observe import read_metrics
from minitron_jax.train.state import abstract_teacher, abstract_train_state, init_train_state, place_teacher
from minitron_jax.train.step import abstract_batch, build_train_step, make_grad_fn

# A teacher with a peaked (std 0.3) distribution and a half-width student: KD has something to learn.
TEACHER = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
               max_position_embeddings=64)
STUDENT = dict(TEACHER, hidden_size=32, intermediate_size=64)


def _np(tree):
    return jax.tree.map(np.array, tree)  # writable copies


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for this module: runs that build the same step (resume, NaN, export) compile once."""
    with persistent_compile_cache(tmp_path_factory.mktemp("xla_cache")) as path:
        yield path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tokenizer, teacher and student HF dirs, a text corpus and a chat corpus."""
    root = tmp_path_factory.mktemp("distill")
    out = tiny_distill_files(root, TEACHER, STUDENT)
    with open(root / "chat.jsonl", "w") as f:
        for i in range(24):
            messages = [{"role": "user", "content": _CORPUS[i % 5]},
                        {"role": "assistant", "content": _CORPUS[(i + 1) % 5]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return out


def make_rc(tiny, run_dir, *extra):
    """A fast fp32 run config for the tiny models; ``extra`` are dotted overrides. Runs share ``train.steps`` (the
    LR schedule is compiled into the step) and stop early with ``train.stop_at``, so they reuse one compilation."""
    r = tiny["root"]
    base = [f"run_dir={run_dir}", f"teacher.path={r / 'teacher'}", f"student.path={r / 'student'}",
            f"data.sources={r / 'corpus.jsonl'}", f"data.cache_dir={r / 'cache'}", "data.seq_len=32",
            "data.batch_size=8", "data.val_rows=0", "train.steps=12", "optim.warmup_steps=1", "optim.peak_lr=1e-2",
            "train.compute_dtype=float32", "teacher.dtype=float32", "loss.chunk_size=64", "checkpoint.every=2",
            "checkpoint.async_save=false", "log.progress=false", "log.tensorboard=false", "export.at_end=false"]
    return load_config(None, base + list(extra))


def random_batch(vocab: int, rows: int = 8, seq: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    seg = np.ones((rows, seq), np.int32)
    seg[:, seq // 2:] = 2  # two packed documents per row
    seg[-1, seq - 4:] = 0  # and some padding
    return complete_rows({"tokens": rng.integers(0, vocab, (rows, seq)), "segment_ids": seg})


def _need_8():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS)")


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
def test_config_errors_are_clear(tiny, tmp_path):
    with pytest.raises(RunConfigError, match=r"unknown config key train\.stpes \(did you mean train\.steps\?\)"):
        make_rc(tiny, tmp_path, "train.stpes=3")
    with pytest.raises(RunConfigError, match=r"train\.steps: expected an integer, got str 'ten'"):
        make_rc(tiny, tmp_path, "train.steps=ten")
    with pytest.raises(RunConfigError, match=r"loss\.kind must be one of"):
        make_rc(tiny, tmp_path, "loss.kind=kl")
    with pytest.raises(RunConfigError, match="exactly one of student.path or student.prune"):
        make_rc(tiny, tmp_path, "student.prune={target_hidden: 16}")
    with pytest.raises(RunConfigError, match="optim: warmup_steps"):
        make_rc(tiny, tmp_path, "optim.warmup_steps=12")
    with pytest.raises(RunConfigError, match="not of the form"):
        make_rc(tiny, tmp_path, "train.steps")
    with pytest.raises(RunConfigError, match="multiple of train.grad_accum"):
        make_rc(tiny, tmp_path, "train.grad_accum=3")
    rc = make_rc(tiny, tmp_path, "optim.peak_lr=3e-4", "data.val_rows=0.25", "loss.top_k=null")
    assert rc.optim.peak_lr == 3e-4 and rc.data.val_rows == 0.25 and rc.loss.top_k is None
    # The printed YAML reads back to the same config.
    (tmp_path / "c.yaml").write_text(rc.to_yaml())
    assert load_config(tmp_path / "c.yaml") == rc


def test_validation_documents_are_held_out_of_training(tiny, tmp_path):
    """The trainer validates on whole documents that no training row touches, and a corpus too small to hold one out
    is a config error naming data.val_rows and the source."""
    from minitron_jax.train.inputs import build_datasets

    rc = make_rc(tiny, tmp_path, "data.val_rows=8", "data.seq_len=16")
    train, val = build_datasets(rc, tiny["tokenizer"])
    assert len(val) >= 8

    def docs(ds):  # the documents of a split, from its rows (each ends with EOS; rows pack them seamlessly)
        rows = ds.rows(np.arange(len(ds)))
        stream = rows["tokens"][rows["segment_ids"] > 0]
        return {tuple(d) for d in np.split(stream, np.flatnonzero(stream == tiny["tokenizer"].eos_token_id) + 1)}

    assert not (docs(train) & docs(val)) - {()}
    (tmp_path / "one.txt").write_text("a single document about the quick brown fox")
    with pytest.raises(RunConfigError, match=r"data\.val_rows=8: .*one\.txt: only 1 document: cannot hold out"):
        build_datasets(make_rc(tiny, tmp_path, "data.val_rows=8", f"data.sources={tmp_path / 'one.txt'}"),
                       tiny["tokenizer"])


def test_demo_and_paper_configs_parse():
    root = Path(__file__).parent.parent / "configs"
    configs = sorted([*root.glob("distill_*.yaml"), *root.glob("teacher_correction_*.yaml")])
    assert {p.name for p in configs} >= {"distill_smollm2_135m_demo.yaml", "distill_llama31_8b_to_4b_width.yaml",
                                         "distill_llama31_8b_to_4b_depth.yaml", "teacher_correction_llama31_8b.yaml"}
    from minitron_jax.compress.spec import PruneSpec

    for path in configs:
        rc = load_config(path)
        if rc.student.prune is not None:
            PruneSpec.from_dict(rc.student.prune)
        if "llama31" in path.name:  # the paper's recipe
            assert (rc.optim.peak_lr, rc.optim.min_lr, rc.optim.warmup_steps) == (1e-4, 1e-5, 40)
            assert rc.data.batch_size == 1152 and rc.data.seq_len == 8192


def test_mismatched_vocab_is_refused(tiny, tmp_path):
    other = LlamaConfig(vocab_size=tiny["teacher_cfg"].vocab_size + 8, **STUDENT)
    save_hf(tmp_path / "other", other, _np(init_params(other, jax.random.key(2))))
    with pytest.raises(RunConfigError, match="different vocabularies"):
        run(make_rc(tiny, tmp_path / "run", f"student.path={tmp_path / 'other'}"))
    # Same size, different tokenizer.
    from minitron_jax.train.models import check_compatible

    tok2 = tiny_tokenizer(300)
    tok2.backend_tokenizer.add_tokens(["<zz>"])
    with pytest.raises(RunConfigError, match="different tokenizers"):
        check_compatible(tiny["teacher_cfg"], tiny["student_cfg"], tiny["tokenizer"], tok2)


def test_student_prune_is_built_by_the_function_the_command_passes(tiny, tmp_path):
    """train/ never imports compress/: a student given as student.prune is pruned by the prune_student function the
    caller hands run() (the distill command passes compress.prune.prune_student), on a fresh start only; without
    one the run is refused before anything is written."""
    import ast

    from minitron_jax.compress.prune import prune_student

    for path in (Path(__file__).parents[1] / "minitron_jax" / "train").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("minitron_jax.compress") for n in names), (path.name, names)

    pruned = ("student.path=null", "student.prune={hidden: 32, ffn: 64, calib_samples: 2, seq_len: 16}",
              f"student.calib={tiny['root'] / 'corpus.jsonl'}")
    with pytest.raises(RunConfigError, match="no pruning function"):
        run(make_rc(tiny, tmp_path / "run", *pruned, "train.stop_at=2"))
    assert not (tmp_path / "run" / "config.yaml").exists()
    calls = []

    def pruner(teacher, options, calib, log):
        calls.append(options)
        return prune_student(teacher, options, calib, log)

    first = run(make_rc(tiny, tmp_path / "run", *pruned, "train.stop_at=2"), prune_student=pruner)
    assert first.step == 2 and len(calls) == 1
    second = run(make_rc(tiny, tmp_path / "run", *pruned, "train.stop_at=4"), prune_student=pruner)
    assert second.resumed_from == 2 and second.step == 4 and len(calls) == 1  # resumed: not pruned again


# ----------------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------------
def _state_and_teacher(rc, mesh, tiny, student_cfg=None):
    s_cfg, t_cfg = student_cfg or tiny["student_cfg"], tiny["teacher_cfg"]
    s_params = _np(init_params(s_cfg, jax.random.key(1)))
    t_params = _np(init_params(t_cfg, jax.random.key(0), std=0.3))
    return init_train_state(rc, mesh, s_cfg, t_cfg, s_params), place_teacher(rc, mesh, t_cfg, t_params)


def test_sharded_step_equals_single_device(tiny, tmp_path):
    """2 updates on a 2×2×2 mesh (FSDP + tensor + data) vs one device, with gradient accumulation and the
    hidden-state loss and its projection in play. Only reduction order differs, so params and optimizer state
    agree to 1e-5. (Adam's first steps are ~lr·sign(g), which turns a 1e-9 gradient difference on a ~0 gradient
    into an lr-sized one; a large Adam eps makes the update smooth in g so the comparison measures the step.)"""
    _need_8()
    rc = make_rc(tiny, tmp_path, "loss.hidden.pairs=[[0,0],[1,1]]", "loss.hidden.weight=0.1", "train.grad_accum=2",
                 "loss.alpha=0.7", "optim.warmup_steps=0", "optim.eps=1e-3")
    batch = random_batch(tiny["teacher_cfg"].vocab_size)
    results = {}
    for shape in [(1, 1, 1), (2, 2, 2)]:
        mesh = make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        ts = build_train_step(rc, mesh, tiny["student_cfg"], tiny["teacher_cfg"])
        state, teacher = _state_and_teacher(rc, mesh, tiny)
        assert "hidden_proj" in state.params
        metrics = []
        for _ in range(2):
            state, m = ts.step(state, teacher, jax.device_put(batch, ts.batch_shardings))
            metrics.append(jax.device_get(m))
        if shape == (2, 2, 2):  # really sharded: FSDP on embed, tensor on mlp
            gate_spec = state.params["model"]["layers"]["gate"].sharding.spec
            assert gate_spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        results[shape] = (_np(state.params), _np(state.opt_state), metrics)
    (p1, o1, m1), (p8, o8, m8) = results[(1, 1, 1)], results[(2, 2, 2)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), (p1, o1), (p8, o8))
    for a, b in zip(m1, m8, strict=True):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)


def test_step_gradients_chunked_naive_and_accumulated_agree(tiny, tmp_path):
    """Inside the step: the chunked loss (small chunks, a ragged last one) gives the naive loss's gradients, and 4
    token-weighted micro-batches give the whole batch's gradient."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    batch = jax.device_put(random_batch(tiny["teacher_cfg"].vocab_size))
    common = ("loss.chunk_size=24", "loss.alpha=0.5", "loss.temperature=2.0")
    out = {}
    for name, extra in {"chunked": (), "naive": ("loss.naive=true",), "accum": ("train.grad_accum=4",)}.items():
        rc = make_rc(tiny, tmp_path, *common, *extra)
        state, teacher = _state_and_teacher(rc, mesh, tiny)
        g, m = jax.jit(make_grad_fn(rc, mesh, tiny["student_cfg"], tiny["teacher_cfg"]))(state.params, teacher, batch)
        out[name] = (_np(g), jax.device_get(m))
    for other in ("naive", "accum"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7, rtol=2e-5), out["chunked"][0],
                     out[other][0])
        np.testing.assert_allclose(out["chunked"][1]["loss"], out[other][1]["loss"], rtol=1e-6)
    assert out["chunked"][1]["tokens"] == out["accum"][1]["tokens"]


def test_chunked_cross_entropy_matches_naive():
    """The teacher-free chunked CE (teacher correction, SFT) equals CE on full logits, with gradients."""
    from minitron_jax.train import chunked_loss, losses

    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 20, 16)).astype(np.float32)
    head = rng.normal(size=(16, 50)).astype(np.float32)
    targets = rng.integers(0, 50, (3, 20))
    weights = (rng.random((3, 20)) > 0.3).astype(np.float32)

    def naive(h, head):
        ce = losses.cross_entropy(jnp.einsum("btd,dv->btv", h, head), targets)
        return jnp.sum(ce * weights) / jnp.sum(weights)

    chunked = lambda h, head: chunked_loss.chunked_cross_entropy(h, head, targets, weights, chunk_size=7)[0]
    np.testing.assert_allclose(chunked(h, head), naive(h, head), rtol=1e-6)
    for a, b in zip(jax.grad(chunked, (0, 1))(h, head), jax.grad(naive, (0, 1))(h, head), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-5)


def test_step_lowers_on_abstract_inputs(tiny, tmp_path):
    """What a dry run does: lower and compile the real step from ShapeDtypeStructs only, on a 2×2×2 mesh."""
    _need_8()
    rc = make_rc(tiny, tmp_path, "train.compute_dtype=bfloat16", "teacher.dtype=bfloat16", "train.remat=full")
    mesh = make_mesh(2, 2, 2)
    s_cfg, t_cfg = tiny["student_cfg"], tiny["teacher_cfg"]
    ts = build_train_step(rc, mesh, s_cfg, t_cfg)
    compiled = ts.step.lower(abstract_train_state(rc, mesh, s_cfg, t_cfg), abstract_teacher(rc, mesh, t_cfg),
                             abstract_batch(rc, mesh)).compile()
    assert compiled.memory_analysis().argument_size_in_bytes > 0
    assert compiled.cost_analysis() is not None


# ----------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------
def test_resume_is_bitwise_exact(tiny, tmp_path):
    """4 steps straight ≡ 2 steps, a fresh start from the checkpoint, 2 more: identical params and losses."""
    straight = run(make_rc(tiny, tmp_path / "a", "train.stop_at=4"), keep_state=True)
    first = run(make_rc(tiny, tmp_path / "b", "train.stop_at=2"))
    assert first.step == 2
    second = run(make_rc(tiny, tmp_path / "b", "train.stop_at=4"), keep_state=True)
    assert second.resumed_from == 2 and second.step == 4
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in first.history + second.history]  # bitwise
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 (straight.state.params, straight.state.opt_state), (second.state.params, second.state.opt_state))
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3, 4]  # the log continues


def test_a_run_on_an_nvidia_gpu_with_einsum_attention_names_the_faster_fused_one(tiny, tmp_path, capsys,
                                                                                    monkeypatch):
    """The default attention stays einsum (docs/gpu.md); where cuDNN would run (an NVIDIA GPU, half precision) the
    run says once what the default costs there. Nowhere else, and not when fused is already chosen."""
    import minitron_jax.train.loop as loop

    note = "note: this is an NVIDIA GPU in half precision: train.attention: fused (cuDNN)"
    run(make_rc(tiny, tmp_path / "cpu", "train.stop_at=1"))
    assert note not in capsys.readouterr().out  # this CPU
    monkeypatch.setattr(loop, "cudnn_fused_attention", lambda dtype: True)  # the hint's test only; the step is as is
    run(make_rc(tiny, tmp_path / "gpu", "train.stop_at=1"))
    assert capsys.readouterr().out.count(note) == 1
    run(make_rc(tiny, tmp_path / "fused", "train.stop_at=1", "train.attention=fused"))
    assert note not in capsys.readouterr().out


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    from minitron_jax.cli.distill import main
    from minitron_jax.train.checkpoints import Checkpointer

    run(make_rc(tiny, tmp_path / "run", "train.stop_at=2", "checkpoint.every=1"))
    # Resume against a teacher whose weights hold a NaN: step 3's loss is not finite.
    params = _np(init_params(tiny["teacher_cfg"], jax.random.key(0), std=0.3))
    save_hf(tmp_path / "nan_teacher", tiny["teacher_cfg"], params, tokenizer=tiny["tokenizer"])
    poison_hf(tmp_path / "nan_teacher")  # final_norm[0] = NaN (save_hf refuses to write it)
    rc = make_rc(tiny, tmp_path / "run", "checkpoint.every=1", f"teacher.path={tmp_path / 'nan_teacher'}")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
        run(rc)
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", rc.checkpoint)
    assert ckpt.latest_step() == 2  # the NaN state was never saved
    ckpt.close()
    (tmp_path / "c.yaml").write_text(rc.to_yaml())
    assert main(["--config", str(tmp_path / "c.yaml")]) == 3  # the CLI's exit code for it


def test_loss_falls_validation_tensorboard_and_export(tiny, tmp_path):
    """12 steps: KD falls, validation KL falls, TensorBoard events exist, and the exported student (at the end and
    via --export-from a checkpoint) loads in transformers with our logits and the teacher's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minitron_jax.cli.distill import main
    from minitron_jax.model import forward

    rc = make_rc(tiny, tmp_path / "run", "data.val_rows=8", "train.eval_every=6", "checkpoint.every=6",
                 "log.tensorboard=true", "export.at_end=true", "export.dtype=float32")
    result = run(rc, keep_state=True)
    kd = [h["kd"] for h in result.history]
    assert np.mean(kd[-3:]) < 0.93 * np.mean(kd[:3]), kd
    assert [v["step"] for v in result.validation] == [6, 12]
    assert result.validation[-1]["kl"] < result.validation[0]["kl"]
    assert all(math.isfinite(v["ppl"]) for v in result.validation)
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))

    assert result.export_path == tmp_path / "run" / "hf"
    # Its model card says what the run did: distillation, steps, tokens, the loss.
    card = (result.export_path / "README.md").read_text()
    assert "### Distillation" in card and "forward_kl on logits (T=1, alpha=1)" in card
    assert f"- Steps: {rc.train.steps}" in card and "library_name: transformers" in card
    assert main(["--export-from", str(tmp_path / "run" / "checkpoints" / "12"), "--out", str(tmp_path / "hf2"),
                 "--dtype", "float32"]) == 0
    tokens = random_batch(tiny["teacher_cfg"].vocab_size, rows=2)["tokens"]
    ours = np.asarray(forward(tiny["student_cfg"], result.state.params["model"], tokens))
    for path in (result.export_path, tmp_path / "hf2"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
        tok = AutoTokenizer.from_pretrained(path)
        assert tok("hello fox")["input_ids"] == tiny["tokenizer"]("hello fox")["input_ids"]


def test_teacher_correction_then_sft(tiny, tmp_path):
    """teacher_correction fine-tunes the teacher with CE (its own run, exporting a corrected teacher); sft trains
    the student on assistant tokens only."""
    r = tiny["root"]
    tc = run(make_rc(tiny, tmp_path / "tc", "mode=teacher_correction", "student.path=null", "train.steps=6",
                     "export.at_end=true", "export.dtype=float32"))
    ce = [h["ce"] for h in tc.history]
    assert ce[-1] < ce[0] and "kd" not in tc.history[0]
    # The corrected teacher is a valid teacher for distillation.
    from minitron_jax.convert import load_model

    assert load_model(tc.export_path).config.replace(extra=()) == tiny["teacher_cfg"]

    sft = run(make_rc(tiny, tmp_path / "sft", "mode=sft", "teacher.path=null", f"data.sources={r / 'chat.jsonl'}",
                      "train.stop_at=6", "data.val_rows=4", "train.eval_every=6", "data.seq_len=64"))
    ce = [h["ce"] for h in sft.history]
    assert ce[-1] < ce[0]
    assert sft.validation and "kl" not in sft.validation[0]
