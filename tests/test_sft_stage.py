"""The chat fine-tuning stage (issue #15): chat records in every layout, the assistant-token mask against a
conversation rendered by hand, the embedded chat asset's fixed split, KD-SFT's loss against a hand computation,
the chat evaluation (NLL, exact match) against a hand computation, and the pipeline's sft stage: it runs, reruns
skip it, an interrupted fine-tuning resumes from its checkpoint, and a changed ``sft.steps`` redoes only the
fine-tuning and its evaluations."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from test_pipeline import _rows, _stage_lines, interrupt_after_checkpoint, make_tiny_setup, run_pipeline
from utils import save_tiny_hf, tiny_tokenizer

from minitron_jax import data
from minitron_jax.data.chat import ChatRecordError, parse_chat_record, prompt_key, read_chat_records, split_records

# One xdist worker runs this whole file (pyproject: --dist loadgroup), so its module fixture, the tiny pipeline with
# an sft stage (~45 s), is built once rather than once per worker.
pytestmark = pytest.mark.xdist_group("sft_stage_run")

# ----------------------------------------------------------------------------------------------------------------
# The assistant-token mask, against a hand-rendered conversation
# ----------------------------------------------------------------------------------------------------------------
CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Is a pear a fruit?"},
                {"role": "assistant", "content": "Yes"},
                {"role": "user", "content": "And a carrot?"},
                {"role": "assistant", "content": "No, a root."}]

# SmolLM2's ChatML, written out by hand.
HAND_RENDERED = ("<|im_start|>system\nAnswer briefly.<|im_end|>\n"
                 "<|im_start|>user\nIs a pear a fruit?<|im_end|>\n"
                 "<|im_start|>assistant\nYes<|im_end|>\n"
                 "<|im_start|>user\nAnd a carrot?<|im_end|>\n"
                 "<|im_start|>assistant\nNo, a root.<|im_end|>\n")
# The token strings of HAND_RENDERED, and which of them the model must learn: each answer and its <|im_end|>, not
# the "assistant\n" header, not the newline after <|im_end|>, nothing of the system or user turns.
HAND_TOKENS = ["<|im_start|>", "system", "\n", "Answer", " briefly", ".", "<|im_end|>", "\n",
               "<|im_start|>", "user", "\n", "Is", " a", " pear", " a", " fruit", "?", "<|im_end|>", "\n",
               "<|im_start|>", "ass", "istant", "\n", "Yes", "<|im_end|>", "\n",
               "<|im_start|>", "user", "\n", "And", " a", " carrot", "?", "<|im_end|>", "\n",
               "<|im_start|>", "ass", "istant", "\n", "No", ",", " a", " root", ".", "<|im_end|>", "\n"]
HAND_ASSISTANT_POSITIONS = [23, 24, 39, 40, 41, 42, 43, 44]


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm2_assets):
    from minitron_jax.convert import gguf_tokenizer_dir, load_tokenizer

    return load_tokenizer(gguf_tokenizer_dir(smollm2_assets["smollm2_gguf"]))


def test_sft_masks_exactly_the_assistant_tokens(smollm_tokenizer):
    tok = smollm_tokenizer
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == HAND_RENDERED
    ids, mask = data.assistant_token_mask(tok, CONVERSATION)
    assert [tok.decode([i]) for i in ids] == HAND_TOKENS
    assert np.flatnonzero(mask).tolist() == HAND_ASSISTANT_POSITIONS
    # The training rows: position t predicts t+1, so the loss sits one position before each assistant token.
    rows = data.sft_examples(tok, [{"messages": CONVERSATION}], 64)
    assert np.flatnonzero(rows["loss_mask"][0]).tolist() == [p - 1 for p in HAND_ASSISTANT_POSITIONS]
    assert rows["tokens"][0, :len(ids)].tolist() == ids.tolist()
    # The same conversation in the input/ideal layout (one question) masks its one answer the same way.
    rec = parse_chat_record({"input": CONVERSATION[:2], "ideal": ["Yes", "yes."]}, "x.jsonl:1")
    ids2, mask2 = data.assistant_token_mask(tok, list(rec.messages))
    assert ids2.tolist() == ids[:26].tolist() and np.flatnonzero(mask2).tolist() == [23, 24]


# ----------------------------------------------------------------------------------------------------------------
# Record layouts and their errors
# ----------------------------------------------------------------------------------------------------------------
def test_record_layouts_parse(tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"input": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "2+2?"}], "ideal": "4"},
        {"input": "Capital of France?", "ideal": ["Paris", "paris, France"], "source": "geo", "split": "eval"},
        {"messages": [{"role": "user", "content": "A or B?"}, {"role": "assistant", "content": "A"}],
         "ideal": "A"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    recs = read_chat_records(path)
    assert [r.ideal for r in recs] == [None, ("4",), ("Paris", "paris, France"), ("A",)]
    assert recs[1].messages[-1] == {"role": "assistant", "content": "4"}
    assert recs[1].prompt == lines[1]["input"]
    assert recs[2].messages == ({"role": "user", "content": "Capital of France?"},
                                {"role": "assistant", "content": "Paris"})
    assert (recs[2].source, recs[2].split) == ("geo", "eval")
    assert recs[0].to_dict() == lines[0]
    assert data.normalize_answer("  Paris. ") == data.normalize_answer("paris") == "paris"
    assert data.normalize_answer("Yes!") == "yes" and data.normalize_answer("B: less dense") == "b: less dense"


@pytest.mark.parametrize("line, problem", [
    ('["not", "an", "object"]', "must be a JSON object"),
    ('{"prompt": "hi", "completion": "ho"}', "needs 'messages'"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "text": "hi"}]}', "messages[0] must be an object with string 'role'"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "role 'robot'"),
    ('{"input": "hi"}', "needs 'ideal'"),
    ('{"input": "hi", "ideal": ""}', "'ideal' must be a non-empty string"),
    ('{"input": "hi", "ideal": [1, 2]}', "'ideal' must be a non-empty string"),
    ('{"input": "", "ideal": "x"}', "'input' is an empty string"),
    ('{"input": "hi", "ideal": "x", "split": "test"}', "'split' must be one of"),
    ('{"input": "hi", "ideal": "x"', "invalid JSON"),
])
def test_malformed_record_is_a_one_line_error_naming_file_and_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "ok", "ideal": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError if problem == "invalid JSON" else ChatRecordError) as err:
        read_chat_records(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: ") and problem in msg and "\n" not in msg, msg


def test_sft_trainer_reads_every_layout_and_names_a_bad_line(tmp_path):
    """The trainer's sft data goes through the same reader: a bad record is the run config error naming its
    line; records marked ``split: eval`` are never trained on."""
    from minitron_jax.train import inputs
    from minitron_jax.train.config import RunConfigError

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"input": "a?", "ideal": "b", "split": "eval"}) + "\n"
                    + json.dumps({"input": "c?", "ideal": "d", "split": "train"}) + "\n")
    assert [r.prompt for r in inputs._chat_records([good])] == [[{"role": "user", "content": "c?"}]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "a?", "ideal": "b"}) + "\n" + json.dumps({"messages": "x"}) + "\n")
    from minitron_jax.train.config import load_config

    rc = load_config(None, [f"run_dir={tmp_path / 'r'}", "mode=sft", "student.path=s", f"data.sources={bad}",
                            "data.seq_len=16", "data.val_rows=0"])
    with pytest.raises(RunConfigError, match=rf"^data.sources: {bad}:2: 'messages' must be"):
        inputs.build_datasets(rc, tiny_tokenizer())


# ----------------------------------------------------------------------------------------------------------------
# The split
# ----------------------------------------------------------------------------------------------------------------
def test_embedded_chat_asset_split_is_fixed_and_disjoint(smollm2_assets):
    records = read_chat_records(smollm2_assets["chat"])
    train, held = split_records(records, eval_records=999)  # the asset's own split wins over the count
    assert (len(train), len(held)) == (360, 120)
    assert {prompt_key(r) for r in train}.isdisjoint({prompt_key(r) for r in held})
    assert not {json.dumps(r.to_dict()["messages"]) for r in train} & {json.dumps(r.to_dict()["messages"])
                                                                        for r in held}
    by_source = {s: sum(r.source == s for r in held) for s in ("quartz", "socialiqa", "tomi", "food")}
    assert by_source == {"quartz": 30, "socialiqa": 30, "tomi": 30, "food": 30}
    # Round-robin: the first four held-out records cover the four sources; every record has a reference answer.
    assert [r.source for r in held[:4]] == ["quartz", "socialiqa", "tomi", "food"]
    assert all(r.ideal and r.messages[-1]["content"] == r.ideal[0] for r in records)


def test_chat_asset_build_is_deterministic(tmp_path, monkeypatch):
    """The asset's transform twice on the same (fake) wheel members gives the same bytes, a disjoint split, and
    repeated prompts kept once."""
    import io

    from minitron_jax.data import assets

    monkeypatch.setattr(assets, "CHAT_PER_SOURCE", 8)
    monkeypatch.setattr(assets, "CHAT_EVAL_PER_SOURCE", 2)
    members = {}
    for j, member in enumerate(assets.CHAT_SOURCES.values()):
        lines = [json.dumps({"input": [{"role": "user", "content": f"q{j}-{i % 15}"}], "ideal": str(i)})
                 for i in range(20)]  # 15 distinct prompts, 5 repeated
        members[member] = ("\n".join(lines) + "\n").encode()

    def build() -> bytes:
        out = io.BytesIO()
        assets._chat_mix({m: io.BytesIO(b) for m, b in members.items()}, out)
        return out.getvalue()

    first = build()
    assert first == build()
    path = tmp_path / "chat.jsonl"
    path.write_bytes(first)
    train, held = split_records(read_chat_records(path), 0)
    assert (len(train), len(held)) == (24, 8)
    assert {prompt_key(r) for r in train}.isdisjoint({prompt_key(r) for r in held})


def test_hash_split_is_deterministic_disjoint_and_order_free(tmp_path):
    rng = random.Random(0)
    recs = [parse_chat_record({"input": f"question {i % 30}", "ideal": f"answer {i}"}, f"f:{i}") for i in range(40)]
    train, held = split_records(recs, 6, seed=3)
    keys = {prompt_key(r) for r in held}
    assert len(keys) == 6 and keys.isdisjoint({prompt_key(r) for r in train})
    assert len(train) + len(held) == 40  # a repeated prompt follows its first occurrence to the same side
    shuffled = recs[:]
    rng.shuffle(shuffled)
    assert {prompt_key(r) for r in split_records(shuffled, 6, seed=3)[1]} == keys
    assert split_records(recs, 6, seed=3) == (train, held)
    assert {prompt_key(r) for r in split_records(recs, 6, seed=4)[1]} != keys
    with pytest.raises(ValueError, match="leaves no training records"):
        split_records(recs, 30)
    both = [parse_chat_record({"input": "q", "ideal": "a", "split": s}, "f:1") for s in ("train", "eval")]
    with pytest.raises(ValueError, match="both the train and the eval split"):
        split_records(both, 1)


# ----------------------------------------------------------------------------------------------------------------
# KD-SFT: the distill loss on the assistant tokens
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tok = tiny_tokenizer()
    save_tiny_hf(root / "teacher", seed=0, tokenizer=tok)
    save_tiny_hf(root / "student", seed=1, tokenizer=tok, hidden_size=32, intermediate_size=48,
                 num_attention_heads=4, num_key_value_heads=2)
    with open(root / "chat.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"input": f"The fox number {i}?", "ideal": "It jumps over the dog."}) + "\n")
    return root, tok


def test_kd_sft_loss_is_the_kd_loss_on_the_assistant_tokens(tiny_pair, tmp_path):
    from minitron_jax.model import hidden_states, logits_from_hidden
    from minitron_jax.train.config import load_config
    from minitron_jax.train.models import load_run_models
    from minitron_jax.train.step import make_loss_fn

    root, tok = tiny_pair
    base = [f"run_dir={tmp_path / 'r'}", "mode=sft", f"student.path={root / 'student'}",
            f"data.sources={root / 'chat.jsonl'}", "data.seq_len=32", "train.compute_dtype=float32",
            "teacher.dtype=float32", "loss.chunk_size=16"]
    assert load_run_models(load_config(None, base), None).teacher_config is None  # plain CE-SFT: no teacher
    rc = load_config(None, base + [f"teacher.path={root / 'teacher'}"])
    assert rc.uses_teacher
    models = load_run_models(rc, None)
    assert models.teacher_config is not None
    batch = data.sft_examples(tok, read_chat_records(root / "chat.jsonl")[:4], 32)
    w = batch["loss_mask"].astype(np.float32)
    assert 0 < w.sum() < w.size / 2  # the answers only
    fn = make_loss_fn(rc, models.student_config, models.teacher_config)
    s_params = jax.tree.map(jnp.asarray, models.student_params)
    t_params = jax.tree.map(jnp.asarray, models.teacher_params)
    objective, sums = fn({"model": s_params}, t_params, {k: jnp.asarray(v) for k, v in batch.items()})

    def logp(config, params):
        h, _, _ = hidden_states(config, params, jnp.asarray(batch["tokens"]),
                                positions=jnp.asarray(batch["positions"]),
                                segment_ids=jnp.asarray(batch["segment_ids"]))
        return np.asarray(jax.nn.log_softmax(logits_from_hidden(config, params, h), axis=-1), np.float64)

    ls, lt = logp(models.student_config, s_params), logp(models.teacher_config, t_params)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)  # forward KL(teacher ‖ student) per position
    assert float(sums["kd"]) == pytest.approx((kl * w).sum(), rel=1e-4)
    assert float(objective) == pytest.approx((kl * w).sum(), rel=1e-4)  # alpha = 1: the KD term only
    assert float(sums["weight"]) == w.sum()


# ----------------------------------------------------------------------------------------------------------------
# The chat evaluation
# ----------------------------------------------------------------------------------------------------------------
def test_chat_eval_nll_and_exact_match_by_hand(tiny_pair):
    from minitron_jax.convert import load_model
    from minitron_jax.evaluate.chat import chat_eval
    from minitron_jax.model import forward

    root, tok = tiny_pair
    m = load_model(root / "teacher")
    params = jax.tree.map(jnp.asarray, m.params)
    eos = tok.eos_token_id
    prompts = ["The quick fox?", "Pruning removes heads?", "Perplexity is the exponential?"]
    width = 96
    # One plain forward pass of a right-padded row (one compiled shape): a causal model's log-probs at positions
    # before the padding are those of the unpadded sequence.
    logprobs = jax.jit(lambda t: jax.nn.log_softmax(forward(m.config, params, t), axis=-1))

    def run(ids: list[int]) -> np.ndarray:
        assert len(ids) <= width
        return np.asarray(logprobs(jnp.asarray([ids + [0] * (width - len(ids))])), np.float64)[0, :len(ids)]

    def greedy(prompt: str, n: int = 4) -> str:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        new = []
        for _ in range(n):
            nxt = int(np.argmax(run(ids + new)[-1]))
            new.append(nxt)
            if nxt == eos:
                break
        return tok.decode(new, skip_special_tokens=True)

    answers = [greedy(p) for p in prompts]
    # Record 0: its reference is the greedy answer shouted, padded and punctuated (equal after normalization);
    # record 1: a wrong reference; record 2: no reference (NLL only, on a messages record).
    records = [parse_chat_record({"input": prompts[0], "ideal": ["nope", "  " + answers[0].upper() + "!"]}, "f:1"),
               parse_chat_record({"input": prompts[1], "ideal": "certainly not this"}, "f:2"),
               parse_chat_record({"messages": [{"role": "user", "content": prompts[2]},
                                               {"role": "assistant", "content": "Of the mean NLL."}]}, "f:3")]
    res = chat_eval(m.config, m.params, tok, records, seq_len=48, eos_token_id=eos, batch_size=2, max_new_tokens=4)
    assert [r.get("answer") for r in res["per_record"]] == [answers[0], answers[1], None]
    assert res["exact_match"] == 0.5 and (res["exact_n"], res["exact_hits"]) == (2, 1)

    # NLL: each conversation alone (no batch, no bucketing), log-softmax, summed over the assistant tokens.
    total = count = 0.0
    for r, row in zip(records, res["per_record"]):
        ids, mask = data.assistant_token_mask(tok, list(r.messages))
        lp = run(ids.tolist())
        nll = -np.array([lp[t, ids[t + 1]] for t in range(len(ids) - 1) if mask[t + 1]])
        assert row["tokens"] == len(nll) and row["nll"] == pytest.approx(nll.mean(), rel=1e-4)
        total, count = total + nll.sum(), count + len(nll)
    assert res["nll"] == pytest.approx(total / count, rel=1e-4) and res["tokens"] == count


# ----------------------------------------------------------------------------------------------------------------
# The pipeline's sft stage
# ----------------------------------------------------------------------------------------------------------------
SFT_STAGES = ["data", "teacher", "importance", "prune.width", "distill.width", "sft_data", "sft.width",
              "eval.teacher", "eval.width.pruned", "eval.width.distilled", "eval.width.sft",
              "chat.teacher", "chat.width.distilled", "chat.width.sft", "export.width"]
REDONE_BY_SFT = {"sft.width", "eval.width.sft", "chat.width.sft"}


def make_sft_setup(root: Path) -> Path:
    """The tiny pipeline of test_pipeline with one student and the sft stage on a small chat file (both layouts,
    a few repeated prompts), KD from the teacher."""
    cfg = make_tiny_setup(root)
    pc = yaml.safe_load(cfg.read_text())
    words = "fox dog teacher student heads pruning".split()
    with open(root / "chat.jsonl", "w") as f:
        for i in range(40):
            q = f"Word {i % 36}?"
            a = words[i % len(words)]
            rec = ({"input": q, "ideal": [a, a + "s"]} if i % 2 else
                   {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "ideal": a})
            f.write(json.dumps(rec) + "\n")
    pc["students"] = {"width": pc["students"]["width"]}
    pc["distill"]["steps"] = 4
    pc["eval"]["mmlu_limit"] = 0  # MMLU is test_pipeline's; here the time goes to the chat evaluation
    pc["sft"] = {"enabled": True, "steps": 4, "loss": "kd", "data": str(root / "chat.jsonl"), "heldout_records": 6,
                 "eval_records": 4, "seq_len": 40, "batch_size": 2, "checkpoint_every": 2, "warmup_steps": 1,
                 "peak_lr": 1.0e-3, "min_lr": 1.0e-4, "max_new_tokens": 3, "eval_batch_size": 2}
    out = root / "sft.yaml"
    out.write_text(yaml.safe_dump(pc))
    return out


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    cfg = make_sft_setup(tmp_path_factory.mktemp("sft_pipeline"))
    run_dir = cfg.parent / "run"
    proc = run_pipeline("--config", str(cfg), f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return cfg, run_dir, proc


def test_sft_stage_names_and_config_checks(tmp_path):
    from minitron_jax.pipeline import PipelineConfigError, load_pipeline_config, stage_names

    cfg = make_sft_setup(tmp_path)
    assert stage_names(load_pipeline_config(cfg)) == SFT_STAGES
    off = stage_names(load_pipeline_config(cfg, ["sft.enabled=false"]))
    assert not [s for s in off if s.startswith(("sft", "chat")) or s.endswith(".sft")]
    for override, message in (("sft.loss=mse", "sft.loss must be one of"),
                              ("sft.students=[wide]", "sft.students names wide"),
                              ("sft.steps=0", "sft.steps must be >= 1"),
                              ("sft.stpes=3", "did you mean sft.steps")):
        with pytest.raises(PipelineConfigError, match=message):
            load_pipeline_config(cfg, [override])


def test_sft_stage_end_to_end(sft_run):
    cfg, run_dir, proc = sft_run
    assert _stage_lines(proc.stdout, "finished") == set(SFT_STAGES)
    rows = _rows(run_dir)
    assert list(rows) == ["teacher", "width", "width+sft"]
    tuned = rows["width+sft"]
    assert tuned["sft_loss"] == "kd" and tuned["tokens"] == 4 * 2 * 40
    assert tuned["ppl_before_sft"] == rows["width"]["ppl"]
    assert (Path(tuned["export"]) / "config.json").is_file() and "/sft/width/" in tuned["export"]
    for r in rows.values():
        assert r["chat_nll"] > 0 and 0.0 <= r["chat_em"] <= 1.0 and r["chat_em_n"] == 4
    assert (tuned["chat_nll_before"], tuned["chat_em_before"]) == (rows["width"]["chat_nll"],
                                                                  rows["width"]["chat_em"])
    assert tuned["chat_nll"] != tuned["chat_nll_before"]  # the fine-tuned model is another model
    report = json.loads((run_dir / "results.json").read_text())
    counts = report["sft"]["records"]
    assert counts["train"] + counts["eval"] == 40 and counts["eval"] >= 6 and report["sft"]["loss"] == "kd"
    assert len(report["sft"]["chat_eval"]["width.sft"]["per_record"]) == 4
    md = (run_dir / "results.md").read_text()
    assert "| chat NLL | chat EM |" in md and "| width+sft |" in md
    assert f"{tuned['chat_nll_before']:.3f} → {tuned['chat_nll']:.3f}" in md
    # The exported student is the fine-tuned one, and its card shows the chat measurements before and after.
    export = run_dir / "export" / "width"
    assert (export / "hf" / "model.safetensors").read_bytes() == \
        (Path(tuned["export"]) / "model.safetensors").read_bytes()
    card = (export / "README.md").read_text()
    assert "| width: distilled + SFT |" in card and "### Supervised fine-tuning" in card
    assert f"{tuned['chat_nll']:.3f}" in card and f"{tuned['chat_nll_before']:.3f}" in card
    assert "forward KL to the teacher on assistant tokens" in card
    # Held-out chat records are never trained on (by prompt).
    train = read_chat_records(run_dir / "sft_data" / "train.jsonl")
    held = read_chat_records(run_dir / "sft_data" / "eval.jsonl")
    assert {prompt_key(r) for r in train}.isdisjoint({prompt_key(r) for r in held})


def test_sft_rerun_skips_every_stage(sft_run):
    cfg, run_dir, _ = sft_run
    before = _rows(run_dir)
    proc = run_pipeline("--config", str(cfg), f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _stage_lines(proc.stdout, "skipped") == set(SFT_STAGES)
    assert _stage_lines(proc.stdout, "finished") == set()
    assert _rows(run_dir) == before


def test_interrupted_sft_resumes_from_its_checkpoint(sft_run):
    """A kill during the fine-tuning after its step-2 checkpoint: the rerun resumes the trainer at step 2, redoes
    only the fine-tuning and its evaluations, and ends with the same model (exact resume) and table."""
    cfg, run_dir, _ = sft_run
    before = _rows(run_dir)
    interrupt_after_checkpoint(run_dir, REDONE_BY_SFT, run_dir / "sft" / "width", 2)
    proc = run_pipeline("--config", str(cfg), f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "from its checkpoint at step 2" in proc.stdout
    # export.width is kept: its marker and directory are whole and its key holds (the resumed model is the same).
    assert _stage_lines(proc.stdout, "finished") == REDONE_BY_SFT
    assert _stage_lines(proc.stdout, "skipped") == set(SFT_STAGES) - REDONE_BY_SFT
    after = _rows(run_dir)
    for key in ("ppl", "chat_nll", "chat_em"):
        assert after["width+sft"][key] == pytest.approx(before["width+sft"][key], rel=1e-6), key


@pytest.mark.slow  # a third pipeline run; the interrupted-run test above already shows which stages sft redoes
def test_changed_sft_steps_redoes_only_the_fine_tuning(sft_run, tmp_path):
    cfg, original, _ = sft_run
    run_dir = tmp_path / "changed"
    shutil.copytree(original, run_dir)
    proc = run_pipeline("--config", str(cfg), f"run_dir={run_dir}", "sft.steps=6")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # Another fine-tuned model: its export (HF, GGUF, card) is redone too.
    redone = REDONE_BY_SFT | {"export.width"}
    assert _stage_lines(proc.stdout, "finished") == redone
    assert _stage_lines(proc.stdout, "skipped") == set(SFT_STAGES) - redone
    assert _rows(run_dir)["width+sft"]["tokens"] == 6 * 2 * 40
