"""The ``README.md`` model card every exported model directory carries (an HF directory, or one beside a GGUF).

    fields = source_card_fields("SmolLM2-135M-Instruct.Q4_1.gguf")   # base_model, license, language of the source
    card = ModelCard(name="SmolLM2-90M-minitron", **fields,
                     architecture_before=architecture_of(teacher_config),
                     architecture_after=architecture_of(student_config),
                     method={"pruning": {"hidden": (576, 480)}, "distillation": {"tokens": 20_000_000}},
                     evaluation=[{"model": "teacher", "perplexity": 14.2}, {"model": "student", "perplexity": 16.9}],
                     files={"hf": "."})
    write_model_card("out/hf", card)

The card follows the Hugging Face convention (https://huggingface.co/docs/hub/model-cards): YAML front matter
between ``---`` lines, then Markdown. :func:`render_model_card` is pure (a string from the dataclass, nothing read);
:func:`write_model_card` writes it atomically. Choices, with what they rest on:

- ``base_model`` goes into the front matter only when it is shaped like a Hub id (``org/name``): the Hub reads the
  field as "base model Hub identifier" and links it in the model tree, so a free-form name (a GGUF's
  ``general.name``, "Smollm2 135M 8k ...") would be a broken link; such a name is still given in the text.
- ``base_model_relation``: the Hub's documented values are ``adapter``, ``merge``, ``quantized`` and ``finetune``
  (hub-docs ``model-cards.md``, "Specifying a base model"); there is no ``pruned``. We write ``finetune``: of the
  four it is the only one that fits a model with a new architecture whose weights derive from the base's. Left to
  itself the Hub infers ``quantized`` for a repository holding GGUF files, which would list a pruned, distilled
  model among the base model's quantizations — the same model at lower precision, which it is not.
- ``library_name``: ``transformers`` for an HF directory (the Hub no longer assumes it from ``config.json`` for
  repositories created after August 2024, so it must be explicit). A card beside a GGUF gets **no**
  ``library_name``: the keys of the Hub's library list (huggingface.js ``model-libraries.ts``) are modelling
  libraries, "not file formats"; GGUF is a file format the Hub detects from the ``.gguf`` files themselves (that is
  what ``hf.co/models?library=gguf`` filters on). We add the tag ``gguf`` instead, as GGUF repositories do.
- ``license`` is carried from the source. A value that is not a license identifier (lowercase, no spaces) becomes
  ``license: other`` with ``license_name`` (a slug of it), as the Hub documents for custom licenses; an unknown
  license is omitted rather than written as ``other`` — ``other`` claims a custom license we do not know exists.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

CARD_NAME = "README.md"
DEFAULT_TAGS = ("minitron", "pruned", "distillation", "llama", "minitron_jax")
FORMATS = ("hf", "gguf")

# A Hub repository id: "org/name", the characters the Hub allows, no spaces. Local paths ("./out", "/tmp/x") and
# free-form names fail it on purpose.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# A license identifier as the Hub spells them (apache-2.0, mit, llama3.1, cc-by-nc-4.0, ...).
_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")
# The quantization / precision part at the end of a GGUF file name: "SmolLM2-135M-Instruct.Q4_1",
# "Llama-3.1-8B-Instruct-Q4_K_M", "model-f16".
_QUANT_SUFFIX = re.compile(r"[.-](I?Q\d[A-Za-z0-9_]*|F16|BF16|F32)$", re.IGNORECASE)

# The Hub's documented values of base_model_relation (hub-docs model-cards.md), and None for "leave it out".
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune", None)

# Architecture rows, in the order shown, with their labels.
ARCHITECTURE_ROWS = (("layers", "Layers"), ("hidden", "Hidden size"), ("ffn", "FFN size"),
                     ("heads", "Attention heads"), ("kv_heads", "KV heads"), ("head_dim", "Head dim"),
                     ("vocab", "Vocabulary"), ("params", "Parameters"), ("blocks", "Blocks (attention/FFN)"))

# Known evaluation columns: (row key, header, formatter). Unknown keys still get a column (generic formatting).
# Perplexity to 2 decimals and accuracies to 3: the differences the pipeline reports live in those digits, and
# more would suggest a precision a few hundred scored questions do not have.
_EVAL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("params", "Params", "params"),
    ("perplexity", "Held-out perplexity ↓", "2f"),
    ("mmlu", "MMLU accuracy", "3f"),
    ("chat_nll", "Chat NLL ↓", "3f"),
    ("exact_match", "Exact match", "3f"),
)
# Keys of a row that are not columns of their own: the label, and the sample count shown with its metric
# ("mmlu_n": 1000 → "MMLU accuracy (n=1000)").
_LABEL_KEY = "model"
_COUNT_SUFFIX = "_n"

# Method steps in the order the pipeline runs them; other keys follow in the order given.
_STEPS = (("importance", "Importance"), ("pruning", "Pruning"), ("layer-by-layer search", "Layer-by-layer search"),
          ("distillation", "Distillation"), ("sft", "Supervised fine-tuning"))
_STEP_KEYS = {
    "samples": "Calibration samples", "seq_len": "Sequence length", "metric": "Metric", "metrics": "Metrics",
    "data": "Data", "hidden": "Hidden size", "ffn": "FFN size", "heads": "Attention heads",
    "kv_heads": "KV heads", "layers": "Layers", "dropped_layers": "Dropped layers", "tokens": "Tokens",
    "steps": "Steps", "loss": "Loss", "final_loss": "Final loss", "teacher": "Teacher", "temperature":
    "Temperature", "lr": "Learning rate", "batch_tokens": "Tokens per step", "records": "Records",
    "epochs": "Epochs",
}


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """Everything the card says. Only ``name`` is required; every section whose field is empty is left out.

    ``architecture_before``/``architecture_after``: mappings with the keys of :data:`ARCHITECTURE_ROWS` (see
    :func:`architecture_of`). ``method``: a mapping step → mapping of facts, steps ``importance``, ``pruning``,
    ``distillation``, ``sft`` (others allowed); a pruned axis is given as ``(before, after)``, dropped layers as a
    list. ``evaluation``: one mapping per evaluated model, ``model`` (its label) plus metric keys (``params``,
    ``perplexity``, ``mmlu`` with ``mmlu_n``, ``chat_nll``, ``exact_match``, or any other). ``eval_setup``: how the
    perplexity was measured (``text``, ``seq_len``, ``tokens``), shown under the table and used in the eval command.
    ``files``: paths relative to the card's directory, ``hf`` (an HF directory) and/or ``gguf`` (a file).
    ``format``: what the card's directory is, ``"hf"`` (library_name transformers) or ``"gguf"`` (a card beside a
    GGUF file; no library_name, tag ``gguf``; see the module docstring)."""

    name: str
    base_model: str | None = None
    license: str | None = None
    license_name: str | None = None  # for a custom license (license "other"): its name and where to read it
    license_link: str | None = None
    language: Sequence[str] = ()
    architecture_before: Mapping[str, Any] | None = None
    architecture_after: Mapping[str, Any] | None = None
    method: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    evaluation: Sequence[Mapping[str, Any]] = ()
    eval_setup: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tags: Sequence[str] = DEFAULT_TAGS
    format: str = "hf"
    pipeline_tag: str = "text-generation"
    chat_template: bool = True  # the tokenizer has one: the transformers snippet chats instead of completing text
    # The HF directory's model class is code shipped beside the weights (a heterogeneous DeciLM export): the
    # transformers snippet must pass trust_remote_code=True.
    remote_code: bool = False
    description: str | None = None
    # How this model relates to base_model on the Hub. "finetune" for our pruned + distilled students (see the
    # module docstring); "quantized" for a plain conversion that lowered the precision; None for a conversion that
    # kept the weights (the Hub has no "same model, other format" value, and infers one from the files).
    base_model_relation: str | None = "finetune"

    def __post_init__(self):
        if not self.name or not str(self.name).strip():
            raise ValueError("a model card needs a name")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.base_model_relation not in BASE_MODEL_RELATIONS:
            raise ValueError(f"base_model_relation must be one of {BASE_MODEL_RELATIONS}, got "
                             f"{self.base_model_relation!r}")
        # Sequences as tuples, so a card built from lists is still a value (and the caller's list is not shared).
        object.__setattr__(self, "language", tuple(self.language or ()))
        object.__setattr__(self, "evaluation", tuple(dict(r) for r in self.evaluation or ()))
        object.__setattr__(self, "tags", tuple(self.tags or ()))


# ---------------------------------------------------------------------------------------------------------------
# Front matter


def is_repo_id(value: str | None) -> bool:
    """Whether ``value`` looks like a Hub repository id (``org/name``), as ``base_model`` must be."""
    return bool(value) and _REPO_ID.fullmatch(value) is not None and not value.startswith(".")


def front_matter(card: ModelCard) -> dict[str, Any]:
    """The card's metadata, keys spelled as the Hub reads them, in a stable order."""
    meta: dict[str, Any] = {}
    if is_repo_id(card.base_model):
        meta["base_model"] = card.base_model
        if card.base_model_relation:  # see the module docstring for why not "pruned"
            meta["base_model_relation"] = card.base_model_relation
    if card.format == "hf":
        meta["library_name"] = "transformers"
    if card.license:
        lic = card.license.strip()
        if _LICENSE_ID.fullmatch(lic):
            meta["license"] = lic
            if lic == "other" and card.license_name:
                meta["license_name"] = card.license_name
        else:
            meta["license"] = "other"
            meta["license_name"] = card.license_name or re.sub(r"[^a-z0-9]+", "-", lic.lower()).strip("-") \
                or "custom"
        if meta["license"] == "other" and card.license_link:
            meta["license_link"] = card.license_link
    if card.language:
        meta["language"] = list(card.language)
    meta["pipeline_tag"] = card.pipeline_tag
    tags = list(dict.fromkeys(card.tags))  # de-duplicated, order kept
    if card.format == "gguf" and "gguf" not in tags:
        tags.append("gguf")
    if tags:
        meta["tags"] = tags
    return meta


def _yaml_block(meta: Mapping[str, Any]) -> str:
    # safe_dump quotes whatever YAML would otherwise read back as another type (a "yes", a "1.0"), so the
    # Hub's parser sees exactly these strings; sort_keys=False keeps our order, allow_unicode keeps names legible.
    return "---\n" + yaml.safe_dump(dict(meta), sort_keys=False, allow_unicode=True, default_flow_style=False) \
        + "---\n"


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def escape_cell(text: Any) -> str:
    """Text safe inside a Markdown table cell: ``|`` escaped (it would end the cell), line breaks as spaces."""
    s = str(text).replace("\\", "\\\\").replace("|", "\\|")
    return re.sub(r"\s*[\r\n]+\s*", " ", s).strip()


def format_params(n: Any) -> str:
    """A parameter count in millions (134.5M) or billions from 10B up (8.03B)."""
    if not _is_number(n):
        return str(n)
    n = float(n)
    if abs(n) >= 1e10:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M"


def format_count(n: Any) -> str:
    """A large count (tokens, records) short and exact enough: 20.0M, 1.5B, 12,345."""
    if not _is_number(n):
        return str(n)
    n = float(n)
    for scale, suffix in ((1e9, "B"), (1e6, "M")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{suffix}"
    return f"{int(n):,}" if n == int(n) else f"{n:g}"


def _is_number(x: Any) -> bool:
    if isinstance(x, bool):  # True is an int to Python, not a number to a reader
        return False
    if isinstance(x, (int, float)):
        return True
    # numpy scalars (a metric straight from an array) without importing numpy here
    return type(x).__module__ == "numpy" and getattr(getattr(x, "dtype", None), "kind", "") in "iuf"


def _metric(value: Any, fmt: str) -> str:
    if value is None or (_is_number(value) and not math.isfinite(float(value))):
        return "—"  # not measured, or not a number (a diverged candidate): an empty-looking cell, never "nan"
    if fmt == "params":
        return format_params(value)
    if _is_number(value):
        if fmt == "g":
            return f"{int(value)}" if float(value) == int(value) else f"{float(value):.4g}"
        return format(float(value), "." + fmt)
    return escape_cell(value)


def _fact(key: str, value: Any) -> str:
    """One method fact as text: a pruned axis ``(576, 480)`` → ``576 → 480``, counts shortened, lists joined."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_fact(k, v)}" for k, v in value.items())
    if isinstance(value, (tuple, list)):
        if key in ("hidden", "ffn", "heads", "kv_heads", "layers") and len(value) == 2:
            return f"{_fact(key, value[0])} → {_fact(key, value[1])}"
        return ", ".join(_fact(key, v) for v in value) if value else "none"
    if key in ("tokens", "records", "batch_tokens", "samples") and _is_number(value):
        return format_count(value)
    if key in ("lr",) and _is_number(value):
        return f"{float(value):g}"
    if key in ("loss", "final_loss") and _is_number(value) and not isinstance(value, int):
        return f"{float(value):.4f}"
    if _is_number(value) and float(value) == int(value):
        return f"{int(value):,}" if abs(value) >= 10000 else str(int(value))
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# Sections


def _architecture_section(card: ModelCard) -> list[str]:
    before, after = card.architecture_before, card.architecture_after
    if not before and not after:
        return []
    cols = [(label, arch) for label, arch in (("Source", before), ("This model", after)) if arch]
    keys = [(k, label) for k, label in ARCHITECTURE_ROWS if any(k in arch for _, arch in cols)]
    extra = [(k, k) for _, arch in cols for k in arch if k not in dict(ARCHITECTURE_ROWS)]
    keys += list(dict.fromkeys(extra))
    lines = ["## Architecture", "", "| | " + " | ".join(c for c, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for key, label in keys:
        cells = []
        for _, arch in cols:
            v = arch.get(key)
            text = "—" if v is None else format_params(v) if key == "params" else escape_cell(_fact(key, v))
            # What pruning changed stands out in the "after" column.
            if arch is after and before and after and before.get(key) != v and v is not None:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {escape_cell(label)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _method_section(card: ModelCard) -> list[str]:
    steps = {k: v for k, v in (card.method or {}).items() if v}
    if not steps:
        return []
    order = [k for k, _ in _STEPS if k in steps] + [k for k in steps if k not in dict(_STEPS)]
    lines = ["## How it was made", "",
             "With minitron_jax, following Minitron ([Muralidharan et al., 2024](https://arxiv.org/abs/2407.14679)): "
             "importance scores from a calibration pass decide what to prune; distillation from the source "
             "recovers quality. The steps this model went through:", ""]
    for key in order:
        facts = steps[key]
        lines += [f"### {dict(_STEPS).get(key, key.replace('_', ' ').capitalize())}", ""]
        if not isinstance(facts, Mapping):
            lines += [str(facts), ""]
            continue
        for k, v in facts.items():
            lines.append(f"- {_STEP_KEYS.get(k, k.replace('_', ' ').capitalize())}: {_fact(k, v)}")
        lines.append("")
    return lines


def _evaluation_section(card: ModelCard) -> list[str]:
    rows = card.evaluation
    if not rows:
        return []
    present = {k for r in rows for k in r}
    known = {k for k, _, _ in _EVAL_COLUMNS}
    cols = [(k, h, f) for k, h, f in _EVAL_COLUMNS if k in present]
    counts = {k[:-len(_COUNT_SUFFIX)] for k in present if k.endswith(_COUNT_SUFFIX)}
    extra = [k for r in rows for k in r if k not in known and k != _LABEL_KEY
             and not (k.endswith(_COUNT_SUFFIX) and k[:-len(_COUNT_SUFFIX)] in present)]
    cols += [(k, k.replace("_", " "), "g") for k in dict.fromkeys(extra)]
    header, cells_by_row = ["Model"], [[escape_cell(r.get(_LABEL_KEY, "—"))] for r in rows]
    for key, title, fmt in cols:
        ns = {r.get(key + _COUNT_SUFFIX) for r in rows if key + _COUNT_SUFFIX in r}
        shared_n = len(ns) == 1 and key in counts and all(key + _COUNT_SUFFIX in r for r in rows if key in r)
        header.append(title + (f" (n={_fact('n', next(iter(ns)))})" if shared_n else ""))
        for r, cells in zip(rows, cells_by_row):
            text = _metric(r.get(key), fmt)
            n = r.get(key + _COUNT_SUFFIX)
            if key in counts and not shared_n and n is not None and text != "—":
                text += f" (n={_fact('n', n)})"  # different sample counts per row: each cell says its own
            cells.append(text)
    lines = ["## Evaluation", "", "| " + " | ".join(escape_cell(h) for h in header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in cells_by_row]
    setup = card.eval_setup or {}
    notes = []
    if "perplexity" in present and setup:
        what = f"{format_count(setup['tokens'])} tokens" if setup.get("tokens") else "tokens"
        if setup.get("text"):
            what += f" of `{setup['text']}`"
        if setup.get("seq_len"):
            what += f" in windows of {setup['seq_len']}"
        notes.append(f"Perplexity over {what}.")
    notes.append("Measured by the minitron_jax pipeline that produced this model; ↓ = lower is better.")
    return lines + [""] + notes + [""]


def _usage_section(card: ModelCard) -> list[str]:
    hf = card.files.get("hf") or ("." if card.format == "hf" else None)
    gguf = card.files.get("gguf")
    lines = ["## Usage", ""]
    if hf is not None:
        prompt = ('messages = [{"role": "user", "content": "What is gravity?"}]\n'
                  'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, '
                  'return_dict=True,\n'
                  '                                       return_tensors="pt")\n') if card.chat_template else \
            'inputs = tokenizer("Gravity is", return_tensors="pt")\n'
        lines += ["With transformers:", "", "```python", "from transformers import AutoModelForCausalLM, "
                  "AutoTokenizer", "",
                  f'path = {json.dumps(hf)}  # this directory, or its Hub id once uploaded',
                  "tokenizer = AutoTokenizer.from_pretrained(path)",
                  "model = AutoModelForCausalLM.from_pretrained(path" +
                  (", trust_remote_code=True)  # runs modeling_decilm.py from this directory" if card.remote_code
                   else ")"),
                  prompt.rstrip("\n"),
                  "outputs = model.generate(**inputs, max_new_tokens=64)",
                  'print(tokenizer.decode(outputs[0][inputs["input_ids"].shape[-1]:], skip_special_tokens=True))',
                  "```", ""]
    if gguf is not None:
        lines += ["With llama.cpp:", "", "```bash",
                  f"llama-cli -m {_shell(gguf)} -cnv" if card.chat_template else
                  f'llama-cli -m {_shell(gguf)} -p "Gravity is" -n 64',
                  f"llama-perplexity -m {_shell(gguf)} -f TEXT.txt -c "  # llama.cpp reads plain text
                  f"{int(card.eval_setup.get('seq_len') or 512)}",
                  "```", ""]
    model = hf if hf is not None else gguf
    if model is not None:
        text = card.eval_setup.get("text") or "TEXT.jsonl"
        seq = int(card.eval_setup.get("seq_len") or 512)
        lines += ["Perplexity with minitron_jax (reads the HF directory or the GGUF file alike):", "", "```bash",
                  f"python -m minitron_jax.eval --model {_shell(model)} --text {_shell(text)} --seq-len {seq}",
                  "```", ""]
    return lines if len(lines) > 2 else []


def _shell(arg: str) -> str:
    # Quoted only when it has to be, so the common case reads as typed.
    return arg if re.fullmatch(r"[A-Za-z0-9_./:=@+-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def render_model_card(card: ModelCard) -> str:
    """The card as text: YAML front matter, then Markdown. Pure: reads nothing, writes nothing."""
    lines = [f"# {card.name}", ""]
    src = card.base_model
    if card.description:
        lines += [card.description.strip(), ""]
    if src:
        link = f"[{src}](https://huggingface.co/{src})" if is_repo_id(src) else f"`{src}`"
        done = [w for k, w in (("pruning", "pruned"), ("distillation", "distilled"), ("sft", "fine-tuned (SFT)"))
                if (card.method or {}).get(k)]
        if done:  # a plain conversion made nothing new: its description says what it is
            how = " and ".join(", ".join(done).rsplit(", ", 1))
            lines += [f"A {how} version of {link}, made with minitron_jax.", ""]
        else:
            lines += [f"Base model: {link}.", ""]
    if card.files:
        lines += ["Files: " + ", ".join(f"`{v}` ({k.upper() if k in FORMATS else k})"
                                        for k, v in card.files.items()), ""]
    for section in (_architecture_section, _method_section, _evaluation_section, _usage_section):
        lines += section(card)
    if card.license:
        lines += ["## License", "", f"`{card.license}`, carried from the source model.", ""]
    return _yaml_block(front_matter(card)) + "\n" + "\n".join(lines).rstrip("\n") + "\n"


def write_model_card(directory: str | os.PathLike, card: ModelCard, *, overwrite: bool = True) -> Path:
    """Write ``directory/README.md`` whole or not at all (temporary file, then rename); returns its path.

    With ``overwrite=False`` an existing card is kept and FileExistsError raised: a README a user wrote by hand
    is not ours to replace. The file gets the umask's permissions (``mkstemp`` would leave 0600)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"cannot write a model card into {directory}: not a directory")
    path = directory / CARD_NAME
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    text = render_model_card(card)  # rendered first: a rendering error leaves nothing behind
    fd, tmp = tempfile.mkstemp(prefix=f".{CARD_NAME}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the name appeared since the check above: never replace a card we were told to keep.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)") from None
            except OSError:  # a file system without hard links: the check above is the best we can do
                if path.exists() or path.is_symlink():
                    raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)") from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# ---------------------------------------------------------------------------------------------------------------
# What the card needs from elsewhere


def architecture_of(config) -> dict[str, Any]:
    """The architecture rows of a :class:`~minitron_jax.config.LlamaConfig` (params counted as HF does), or of a
    heterogeneous :class:`~minitron_jax.hetero.HeteroConfig`: its FFN widths and KV heads vary by layer, so those
    rows give the range over the layers that have the sub-block, and a ``blocks`` row lists the runs of equal
    layers (``gqa2/mlp512 x3, linear/none, ...``)."""
    from minitron_jax import arch  # lazy: rendering a card should not need jax

    if not arch.is_hetero(config):
        return {"layers": config.num_layers, "hidden": config.hidden_size, "ffn": config.intermediate_size,
                "heads": config.num_heads, "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
                "vocab": config.vocab_size, "params": arch.count_params(config)}
    base = config.base
    widths = [b.ffn.width for b in config.blocks if b.ffn.kind == "mlp"]
    kv = [b.attention.kv_heads for b in config.blocks if b.attention.kind == "gqa"]
    runs = ", ".join(spec.describe() + (f" x{stop - start}" if stop - start > 1 else "")
                     for start, stop, spec in config.segments())
    return {"layers": config.num_layers, "hidden": base.hidden_size, "ffn": _per_layer(widths),
            "heads": base.num_heads, "kv_heads": _per_layer(kv), "head_dim": base.head_dim,
            "vocab": base.vocab_size, "params": arch.count_params(config), "blocks": runs}


def is_remote_code(config) -> bool:
    """Whether an HF export of ``config`` needs ``trust_remote_code`` (a heterogeneous model, written as DeciLM)."""
    from minitron_jax import arch

    return arch.is_hetero(config)


def _per_layer(values: list[int]) -> Any:
    # One number when every layer agrees (the row then reads as a uniform model's), else the range.
    if not values:
        return "none"
    lo, hi = min(values), max(values)
    return lo if lo == hi else f"{lo}–{hi} (per layer)"


def _hub_id_from_url(url: Any) -> str | None:
    if not isinstance(url, str):
        return None
    m = re.fullmatch(r"https?://(?:www\.)?(?:huggingface\.co|hf\.co)/([^/?#]+/[^/?#]+?)/?(?:[?#].*)?", url.strip())
    return m.group(1) if m and is_repo_id(m.group(1)) else None


def _str_or_none(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value.strip() or None if isinstance(value, str) else None


def _languages(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable):
        return []
    return [s for s in (_str_or_none(v) for v in value) if s]


def gguf_base_model(metadata: Mapping[str, Any], path: str | os.PathLike) -> str | None:
    """The Hub id (or, failing that, the name) of the model a GGUF holds, from its ``general.*`` metadata.

    In order: the source repository llama.cpp's converter records (``general.source.repo_url`` /
    ``general.source.url``, when on huggingface.co); then ``general.organization`` + the file name without its
    quantization suffix, when the name starts with ``{basename}-{size_label}`` (the metadata corroborates the file
    name, and the file name has the casing and variant — "Instruct" — the lowercase basename lacks:
    ``SmolLM2-135M-Instruct.Q4_1.gguf`` → ``HuggingFaceTB/SmolLM2-135M-Instruct``); else ``general.name`` as given
    (not a Hub id: the card then names it in the text only)."""
    for key in ("general.source.repo_url", "general.source.url"):
        hub = _hub_id_from_url(metadata.get(key))
        if hub:
            return hub
    org = _str_or_none(metadata.get("general.organization"))
    base = _str_or_none(metadata.get("general.basename"))
    size = _str_or_none(metadata.get("general.size_label"))
    stem = _QUANT_SUFFIX.sub("", Path(path).name.removesuffix(".gguf"))
    if org and base and stem:
        prefix = f"{base}-{size}" if size else base
        candidate = f"{org}/{stem}"
        if stem.lower().startswith(prefix.lower()) and is_repo_id(candidate):
            return candidate
    return _str_or_none(metadata.get("general.name"))


def _read_front_matter(readme: Path) -> dict[str, Any]:
    """The YAML front matter of a README.md, or {} when it has none or it does not parse (a hand-written card
    with broken YAML must not stop an export)."""
    try:
        text = readme.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    m = re.match(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", text, re.DOTALL)
    if not m:
        return {}
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _hub_cache_id(directory: Path) -> str | None:
    # huggingface_hub's cache keeps a download of org/name under ".../models--org--name/snapshots/<sha>/".
    for part in directory.resolve().parts:
        m = re.fullmatch(r"models--([^-/][^/]*?)--([^/]+)", part)
        if m and is_repo_id(f"{m.group(1)}/{m.group(2)}"):
            return f"{m.group(1)}/{m.group(2)}"
    return None


def source_card_fields(path: str | os.PathLike) -> dict[str, Any]:
    """``base_model``, ``license`` (with ``license_name``/``license_link`` for a custom one) and ``language`` of a
    source model (a ``.gguf`` file or an HF directory), ready to pass to :class:`ModelCard`. A field the source does
    not say is None (``language``: an empty list); only a missing or unreadable source raises.

    GGUF: ``general.license`` and ``general.languages``; base_model by :func:`gguf_base_model`. HF directory:
    license and language from its README.md front matter; base_model from ``config.json``'s ``_name_or_path``
    when that is a Hub id, else from a Hub-cache path (``models--org--name``), else the README's own
    ``base_model`` — the source's ancestor, still the right family in the Hub's model tree."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"source model {path} does not exist")
    fields: dict[str, Any] = {"base_model": None, "license": None, "license_name": None, "license_link": None,
                              "language": []}
    if path.is_file():
        # read_gguf, not a bare GGUFReader: it checks the header against the file size before gguf-py believes any
        # count in it. It costs a few seconds (gguf-py parses the vocabulary too), once per export.
        from minitron_jax.convert.gguf import read_gguf  # lazy: gguf-py is only needed for GGUF sources

        meta = read_gguf(path).metadata
        fields["base_model"] = gguf_base_model(meta, path)
        fields["license"] = _str_or_none(meta.get("general.license"))
        fields["license_name"] = _str_or_none(meta.get("general.license.name"))
        fields["license_link"] = _str_or_none(meta.get("general.license.link"))
        fields["language"] = _languages(meta.get("general.languages"))
        return fields
    card = _read_front_matter(path / CARD_NAME) if (path / CARD_NAME).is_file() else {}
    config: dict[str, Any] = {}
    try:
        loaded = json.loads((path / "config.json").read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass  # no or broken config.json: the loader reports that; here it only means no _name_or_path
    name = _str_or_none(config.get("_name_or_path"))
    readme_base = card.get("base_model")
    if isinstance(readme_base, list):  # a merge lists several; the first is as good a family as any
        readme_base = readme_base[0] if readme_base else None
    for candidate in (name, _hub_cache_id(path), _str_or_none(readme_base)):
        if is_repo_id(candidate) and not Path(candidate).exists():  # "out/hf" is a local path, not an id
            fields["base_model"] = candidate
            break
    lic = card.get("license")
    fields["license"] = _str_or_none(lic[0] if isinstance(lic, list) and lic else lic)
    fields["license_name"] = _str_or_none(card.get("license_name"))
    fields["license_link"] = _str_or_none(card.get("license_link"))
    fields["language"] = _languages(card.get("language"))
    return fields


def derived_card(name: str, config, source: str | os.PathLike | None, method: Mapping[str, Mapping[str, Any]],
                 *, tokenizer: Any = None) -> ModelCard:
    """The card of a model a command made from ``source`` (the distill/prune commands' exports): the source's
    license and base model and its architecture before, ours after, and ``method``. A source that cannot be read
    (gone, or not a format we read) leaves those fields empty rather than failing the export it describes."""
    fields: dict[str, Any] = {}
    before = None
    if source is not None and Path(source).exists():
        from minitron_jax.convert import read_source_config  # lazy: the renderer itself needs no model code

        try:
            fields = source_card_fields(source)
            before = architecture_of(read_source_config(source))
        except (OSError, ValueError):
            fields, before = {}, None
    return ModelCard(name=name, **fields, architecture_before=before, architecture_after=architecture_of(config),
                     remote_code=is_remote_code(config), method=method,
                     chat_template=bool(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else True)
