"""The model card: front matter the Hub reads, the tables the pipeline measured, atomic writes, source metadata."""

import json
import os
import re

import pytest
import yaml

from minitron_jax.convert.model_card import (
    DEFAULT_TAGS,
    ModelCard,
    architecture_of,
    escape_cell,
    format_params,
    front_matter,
    gguf_base_model,
    is_repo_id,
    render_model_card,
    source_card_fields,
    write_model_card,
)

BEFORE = {"layers": 30, "hidden": 576, "ffn": 1536, "heads": 9, "kv_heads": 3, "head_dim": 64, "vocab": 49152,
          "params": 134_515_008}
AFTER = dict(BEFORE, hidden=480, ffn=1024, params=95_012_345)


def full_card(**changes) -> ModelCard:
    fields = dict(
        name="SmolLM2-95M-minitron", base_model="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0",
        language=["en"], architecture_before=BEFORE, architecture_after=AFTER,
        method={"importance": {"samples": 1024, "seq_len": 512, "metric": "activation"},
                "pruning": {"hidden": (576, 480), "ffn": (1536, 1024)},
                "distillation": {"tokens": 20_480_000, "steps": 2500, "loss": "forward KL",
                                 "teacher": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                "sft": {"records": 5000, "steps": 300}},
        evaluation=[{"model": "teacher", "params": 134_515_008, "perplexity": 14.23456, "mmlu": 0.30125,
                     "mmlu_n": 1000, "chat_nll": 1.23456},
                    {"model": "student", "params": 95_012_345, "perplexity": 17.9, "mmlu": 0.281, "mmlu_n": 1000,
                     "chat_nll": 1.5, "exact_match": 0.125}],
        eval_setup={"text": "wikipedia.jsonl", "seq_len": 512, "tokens": 200_000},
        files={"hf": "."})
    fields.update(changes)
    return ModelCard(**fields)


def split_card(text: str) -> tuple[dict, str]:
    m = re.match(r"\A---\n(.*?)\n---\n(.*)\Z", text, re.DOTALL)
    assert m, text[:200]
    return yaml.safe_load(m.group(1)), m.group(2)


def table(body: str, heading: str) -> list[list[str]]:
    """The rows (header first, separator dropped) of the first table after ``## heading``; cells unescaped."""
    section = body.split(f"## {heading}\n", 1)[1].lstrip("\n")
    lines = []
    for ln in section.splitlines():
        if not ln.startswith("|"):
            break
        lines.append(ln)
    rows = []
    for ln in lines:
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln)[1:-1]]
        if not all(set(c) <= set("-:") for c in cells):
            rows.append(cells)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def test_front_matter_parses_and_carries_the_hub_fields():
    meta, body = split_card(render_model_card(full_card()))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "finetune"  # one of the Hub's four values; there is no "pruned"
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert meta["language"] == ["en"]
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == list(DEFAULT_TAGS)
    assert body.lstrip().startswith("# SmolLM2-95M-minitron")


def test_gguf_card_has_no_library_name_and_the_gguf_tag():
    meta, body = split_card(render_model_card(full_card(format="gguf", files={"gguf": "model-q8_0.gguf"})))
    assert "library_name" not in meta
    assert meta["tags"][-1] == "gguf" and meta["tags"].count("gguf") == 1
    assert "llama-cli -m model-q8_0.gguf -cnv" in body
    assert "llama-perplexity -m model-q8_0.gguf" in body
    assert "AutoModelForCausalLM" not in body  # no HF directory beside it
    assert "python -m minitron_jax.eval --model model-q8_0.gguf --text wikipedia.jsonl --seq-len 512" in body


def test_evaluation_table_one_row_per_model_with_the_numbers():
    _, body = split_card(render_model_card(full_card()))
    rows = table(body, "Evaluation")
    assert rows[0] == ["Model", "Params", "Held-out perplexity ↓", "MMLU accuracy (n=1000)", "Chat NLL ↓",
                       "Exact match"]
    assert rows[1:] == [["teacher", "134.5M", "14.23", "0.301", "1.235", "—"],
                        ["student", "95.0M", "17.90", "0.281", "1.500", "0.125"]]


def test_evaluation_columns_only_those_present_and_unknown_metrics_kept():
    card = full_card(evaluation=[{"model": "a", "perplexity": 10.0, "bleu": 0.25},
                                 {"model": "b", "perplexity": float("nan"), "mmlu": 0.5, "mmlu_n": 200},
                                 {"model": "c", "mmlu": 0.4, "mmlu_n": 300}])
    rows = table(split_card(render_model_card(card))[1], "Evaluation")
    # Different sample counts: each cell says its own n; NaN (a diverged model) is shown as not measured.
    assert rows == [["Model", "Held-out perplexity ↓", "MMLU accuracy", "bleu"],
                    ["a", "10.00", "—", "0.25"],
                    ["b", "—", "0.500 (n=200)", "—"],
                    ["c", "—", "0.400 (n=300)", "—"]]


def test_pipes_in_cells_are_escaped():
    card = full_card(evaluation=[{"model": "pruned | no KD", "perplexity": 85.1},
                                 {"model": "multi\nline", "perplexity": 20.0}])
    _, body = split_card(render_model_card(card))
    assert "| pruned \\| no KD | 85.10 |" in body
    assert "| multi line | 20.00 |" in body
    rows = table(body, "Evaluation")
    assert [len(r) for r in rows] == [2, 2, 2]  # the escaped pipe did not split the cell
    assert escape_cell("a|b\\") == "a\\|b\\\\"


def test_architecture_table_before_after():
    rows = table(split_card(render_model_card(full_card()))[1], "Architecture")
    assert rows[0] == ["", "Source", "This model"]
    got = {r[0]: r[1:] for r in rows[1:]}
    assert got["Hidden size"] == ["576", "**480**"]  # what pruning changed is bold
    assert got["FFN size"] == ["1536", "**1024**"]
    assert got["Layers"] == ["30", "30"]
    assert got["Parameters"] == ["134.5M", "**95.0M**"]


def test_method_section_lists_each_step():
    _, body = split_card(render_model_card(full_card()))
    method = body.split("## How it was made\n", 1)[1].split("\n## ", 1)[0]
    assert [h for h in re.findall(r"^### (.+)$", method, re.M)] == ["Importance", "Pruning", "Distillation",
                                                                     "Supervised fine-tuning"]
    assert "- Hidden size: 576 → 480" in method
    assert "- FFN size: 1536 → 1024" in method
    assert "- Tokens: 20.5M" in method
    assert "- Calibration samples: 1,024" in method
    card = full_card(method={"pruning": {"dropped_layers": [10, 12, 14]}})
    assert "- Dropped layers: 10, 12, 14" in render_model_card(card)


def test_optional_sections_absent_when_not_given():
    text = render_model_card(ModelCard(name="bare"))
    meta, body = split_card(text)
    assert set(meta) == {"library_name", "pipeline_tag", "tags"}
    for heading in ("## Architecture", "## How it was made", "## Evaluation", "## License"):
        assert heading not in body
    # An HF card always shows how to load its own directory.
    assert 'path = "."' in body and "llama-cli" not in body
    # Only some method steps: only those appear, and the summary names what happened.
    body = split_card(render_model_card(ModelCard(name="x", base_model="org/src",
                                                  method={"pruning": {"ffn": (8, 4)}})))[1]
    assert "### Pruning" in body and "### Distillation" not in body and "### Importance" not in body
    assert "A pruned version of [org/src]" in body


def test_base_model_that_is_not_a_hub_id_stays_out_of_the_front_matter():
    meta, body = split_card(render_model_card(full_card(base_model="Smollm2 135M 8k Lc100K Mix1 Ep2")))
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert "`Smollm2 135M 8k Lc100K Mix1 Ep2`" in body
    assert is_repo_id("HuggingFaceTB/SmolLM2-135M") and not is_repo_id("./out/hf") and not is_repo_id("a b/c")


def test_license_unknown_custom_and_other():
    assert "license" not in front_matter(full_card(license=None))  # unknown: omitted, not claimed "other"
    meta = front_matter(full_card(license="Llama 3.1 Community License", license_link="https://example.org/l"))
    assert meta["license"] == "other"
    assert meta["license_name"] == "llama-3-1-community-license"
    assert meta["license_link"] == "https://example.org/l"
    meta = front_matter(full_card(license="other", license_name="my-license"))
    assert meta["license"] == "other" and meta["license_name"] == "my-license"


def test_yaml_values_that_look_like_other_types_stay_strings():
    meta = front_matter(full_card(tags=["yes", "1.0", "minitron"], language=["no"]))
    text = render_model_card(full_card(tags=["yes", "1.0", "minitron"], language=["no"]))
    parsed, _ = split_card(text)
    assert parsed["tags"] == ["yes", "1.0", "minitron"] == meta["tags"]
    assert parsed["language"] == ["no"]  # Norwegian, not False


def test_format_numbers():
    assert format_params(134_515_008) == "134.5M"
    assert format_params(8_030_261_248) == "8030.3M"
    assert format_params(80_302_612_480) == "80.30B"


def test_card_validation():
    with pytest.raises(ValueError):
        ModelCard(name=" ")
    with pytest.raises(ValueError):
        ModelCard(name="x", format="onnx")


def test_huggingface_hub_reads_the_card():
    hub = pytest.importorskip("huggingface_hub")
    for card in (full_card(), full_card(format="gguf", files={"gguf": "m.gguf"})):
        text = render_model_card(card)
        parsed = hub.ModelCard(text)  # raises on front matter it cannot read
        data = parsed.data.to_dict()
        assert data["base_model"] == card.base_model and data["license"] == "apache-2.0"
        assert data["tags"][: len(DEFAULT_TAGS)] == list(DEFAULT_TAGS)
        assert data["base_model_relation"] == "finetune"
        assert parsed.text.lstrip().startswith(f"# {card.name}")
        # The dataclass the Hub library builds cards from accepts every key we write.
        hub.ModelCardData(**data)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def test_write_is_atomic_and_overwrite_semantics(tmp_path):
    path = write_model_card(tmp_path, full_card())
    assert path == tmp_path / "README.md"
    assert path.read_text(encoding="utf-8") == render_model_card(full_card())
    assert os.listdir(tmp_path) == ["README.md"]  # no temporary file left
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask

    write_model_card(tmp_path, full_card(name="second"))  # overwrite=True (default) replaces
    assert "# second" in path.read_text()
    with pytest.raises(FileExistsError):
        write_model_card(tmp_path, full_card(name="third"), overwrite=False)
    assert "# second" in path.read_text()
    assert os.listdir(tmp_path) == ["README.md"]

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    write_model_card(fresh, full_card(name="new"), overwrite=False)  # nothing there: writes
    assert "# new" in (fresh / "README.md").read_text()
    with pytest.raises(NotADirectoryError):
        write_model_card(tmp_path / "missing", full_card())


def test_failed_render_leaves_nothing(tmp_path):
    (tmp_path / "README.md").write_text("keep me")

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_model_card(tmp_path, full_card(evaluation=[{"model": Boom()}]))
    assert (tmp_path / "README.md").read_text() == "keep me"
    assert os.listdir(tmp_path) == ["README.md"]


# ---------------------------------------------------------------------------------------------------------------
# Source metadata


def test_source_fields_of_the_embedded_gguf(smollm2_assets):
    fields = source_card_fields(smollm2_assets["smollm2_gguf"])
    assert fields["license"] == "apache-2.0"
    assert fields["language"] == ["en"]
    # organization HuggingFaceTB + the file name SmolLM2-135M-Instruct.Q4_1.gguf, corroborated by
    # basename "smollm2" and size_label "135M".
    assert fields["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = ModelCard(name="x", **fields)
    assert front_matter(card)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_gguf_base_model_order():
    meta = {"general.organization": "HuggingFaceTB", "general.basename": "smollm2", "general.size_label": "135M",
            "general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2"}
    assert gguf_base_model(meta, "/c/SmolLM2-135M-Instruct.Q4_1.gguf") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert gguf_base_model(meta, "SmolLM2-135M-Instruct-Q4_K_M.gguf") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # A file name the metadata does not corroborate: the name as given.
    assert gguf_base_model(meta, "renamed.gguf") == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    # The source repository llama.cpp recorded wins.
    src = dict(meta, **{"general.source.url": "https://huggingface.co/org/Real-Model"})
    assert gguf_base_model(src, "renamed.gguf") == "org/Real-Model"
    assert gguf_base_model({}, "x.gguf") is None


def test_source_fields_of_an_hf_dir(tmp_path):
    d = tmp_path / "plain"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"_name_or_path": "HuggingFaceTB/SmolLM2-135M", "vocab_size": 8}))
    assert source_card_fields(d) == {"base_model": "HuggingFaceTB/SmolLM2-135M", "license": None,
                                     "license_name": None, "license_link": None, "language": []}

    (d / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n- fr\nbase_model: org/ancestor\n---\n"
                                 "# A model\n")
    fields = source_card_fields(d)
    assert fields["license"] == "apache-2.0" and fields["language"] == ["en", "fr"]
    assert fields["base_model"] == "HuggingFaceTB/SmolLM2-135M"  # the model itself before its ancestor

    # No _name_or_path: a Hub-cache path names the repository; else the README's base_model is the fallback.
    cached = tmp_path / "models--HuggingFaceTB--SmolLM2-360M" / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert source_card_fields(cached)["base_model"] == "HuggingFaceTB/SmolLM2-360M"
    (d / "config.json").write_text(json.dumps({"_name_or_path": str(d)}))  # a local path is not an id
    assert source_card_fields(d)["base_model"] == "org/ancestor"


def test_source_fields_tolerate_missing_and_broken_metadata(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("not json")
    (d / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert source_card_fields(d) == {"base_model": None, "license": None, "license_name": None,
                                     "license_link": None, "language": []}
    (d / "README.md").write_text("# no front matter\n")
    assert source_card_fields(d)["license"] is None
    with pytest.raises(FileNotFoundError):
        source_card_fields(tmp_path / "absent")


def test_architecture_of_a_config():
    from minitron_jax.config import LlamaConfig
    from minitron_jax.model import count_params

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    assert architecture_of(cfg) == {"layers": 2, "hidden": 32, "ffn": 48, "heads": 4, "kv_heads": 2,
                                    "head_dim": 8, "vocab": 64, "params": count_params(cfg)}


# ---------------------------------------------------------------------------------------------------------------
# Cards written by the convert command


def _tiny_hf(tmp_path):
    import jax
    import numpy as np
    from utils import tiny_tokenizer

    from minitron_jax.config import LlamaConfig
    from minitron_jax.convert import save_hf
    from minitron_jax.model import init_params

    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                         extra=(("bos_token_id", 0), ("eos_token_id", 0)))
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
    src = tmp_path / "src"
    save_hf(src, config, params, tokenizer=tiny_tokenizer(300))
    # The source says where it comes from, as a model downloaded from the Hub does.
    (src / "README.md").write_text("---\nlicense: mit\nbase_model: someorg/tiny-base\nlanguage: [en]\n---\n# tiny\n")
    return src


def test_convert_writes_cards(tmp_path, capsys):
    """An HF destination always carries a card (inside the atomic write); a GGUF one with --card, beside it, and
    never over a README.md that is already there. A lossless conversion leaves base_model_relation out; a
    quantized one says "quantized"."""
    from minitron_jax.cli.convert import main as convert_main

    src = _tiny_hf(tmp_path)
    assert convert_main([str(src), str(tmp_path / "hf_out"), "--quiet"]) == 0
    meta = yaml.safe_load((tmp_path / "hf_out" / "README.md").read_text().split("---")[1])
    assert meta["license"] == "mit" and meta["base_model"] == "someorg/tiny-base"
    assert meta["library_name"] == "transformers" and "base_model_relation" not in meta

    out = tmp_path / "g" / "tiny-q8_0.gguf"
    assert convert_main([str(src), str(out), "--quant", "q8_0", "--card", "--quiet"]) == 0
    text = (out.parent / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model_relation"] == "quantized" and "gguf" in meta["tags"] and "library_name" not in meta
    assert "tiny-q8_0.gguf" in text and "made with minitron_jax" not in text  # a conversion made nothing new

    # A README.md already beside the destination: refused before the GGUF is written, the README kept.
    other = tmp_path / "g" / "second.gguf"
    assert convert_main([str(src), str(other), "--card", "--quiet"]) == 2
    assert "README.md already exists" in capsys.readouterr().err
    assert not other.exists() and (out.parent / "README.md").read_text() == text
    # --card means nothing for an HF directory (it always gets one): refused, not ignored.
    assert convert_main([str(src), str(tmp_path / "hf2"), "--card", "--quiet"]) == 2
    assert not (tmp_path / "hf2").exists()


def test_relation_is_checked():
    with pytest.raises(ValueError, match="base_model_relation"):
        ModelCard(name="x", base_model_relation="pruned")
    meta = front_matter(ModelCard(name="x", base_model="a/b", base_model_relation=None))
    assert meta["base_model"] == "a/b" and "base_model_relation" not in meta
