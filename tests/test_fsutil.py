"""Directory writes against hostile or unlucky input: destinations that hold the source, directories we did not
write, two writers at once, writers killed mid-write, a full or read-only disk, nonsense shard sizes."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from utils import save_tiny_hf, tiny_tokenizer

from minitron_jax import fsutil
from minitron_jax.cli.convert import main as convert_main
from minitron_jax.exitcodes import BadInputError, BusyError, SystemRefusedError
from minitron_jax.fsutil import MARKER_NAME, atomic_directory, check_destination, lock_directory, lock_path_for


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny HF model with a tokenizer (written by transformers: no marker of ours)."""
    return save_tiny_hf(tmp_path_factory.mktemp("src") / "model", tokenizer=tiny_tokenizer())


def convert(*args):
    return convert_main([str(a) for a in args] + ["--quiet"])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def tree(path: Path) -> dict:
    """{relative path: bytes} of every file under ``path``: to check that a refused write changed nothing."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------------
# 1. A destination that holds the source, and directories we did not write
# ----------------------------------------------------------------------------------------------------------------
def test_destination_overlapping_the_source_is_refused(model_dir, tmp_path, capsys):
    sb = tmp_path / "sb"
    sb.mkdir()
    src = sb / "model"
    os.symlink(model_dir, src)  # the source reached through a symlink: resolved before comparing
    (sb / "notes.txt").write_text("unrelated")
    before = tree(model_dir)
    (tmp_path / "link").symlink_to(model_dir)
    for dst, how in ((sb, "contains"), (src, "is"), (model_dir, "is"), (tmp_path / "link", "is"),
                     (model_dir / "sub", "lies inside")):
        assert convert(src, dst, "--overwrite") == 2
        err = one_error_line(capsys)
        assert f" {how} the source " in err and str(src) in err and str(Path(dst).absolute()) in err, err
    assert tree(model_dir) == before and (sb / "notes.txt").read_text() == "unrelated"
    assert sorted(p.name for p in sb.iterdir()) == ["model", "notes.txt"]


def test_overwrite_replaces_only_directories_we_wrote(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from minitron_jax.convert import load_model

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "thesis.tex").write_text("mine")
    assert convert(model_dir, dst, "--overwrite") == 2
    err = one_error_line(capsys)
    assert f"{dst} exists and was not written by minitron_jax; refusing to replace it" in err
    assert (dst / "thesis.tex").read_text() == "mine"

    (tmp_path / "afile").write_text("x")
    assert convert(model_dir, tmp_path / "afile", "--overwrite") == 2
    assert "is not a directory" in one_error_line(capsys) and (tmp_path / "afile").read_text() == "x"

    (dst / "thesis.tex").unlink()  # an empty directory may be replaced
    assert convert(model_dir, dst, "--overwrite") == 0
    marker = json.loads((dst / MARKER_NAME).read_text())
    assert marker["tool"] == "minitron_jax" and marker["written"] > 0
    assert convert(model_dir, dst, "--overwrite") == 0  # ours now: replaceable
    # The marker is invisible to both loaders.
    assert type(AutoModelForCausalLM.from_pretrained(dst)).__name__ == "LlamaForCausalLM"
    assert load_model(dst).format == "hf"
    # An Orbax checkpoint carries it too, and still loads.
    assert convert(dst, tmp_path / "ck", "--to", "orbax") == 0
    assert (tmp_path / "ck" / MARKER_NAME).is_file() and load_model(tmp_path / "ck").format == "orbax"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ck", "dst"]  # no lock or staging left


def test_check_destination_directly(tmp_path):
    src = tmp_path / "a" / "model"
    src.mkdir(parents=True)
    with pytest.raises(BadInputError, match="contains the source"):
        check_destination(tmp_path / "a", overwrite=True, sources=[src])
    with pytest.raises(BadInputError, match="lies inside the source"):
        check_destination(src / "x", sources=[src])
    with pytest.raises(FileExistsError, match="already exists"):
        check_destination(src)
    assert check_destination(tmp_path / "b", sources=[src, None]) == tmp_path / "b"
    assert check_destination(src, overwrite=True) == src  # empty


# ----------------------------------------------------------------------------------------------------------------
# 2. One writer at a time
# ----------------------------------------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from minitron_jax.fsutil import {what}
    with {what}(sys.argv[1]) as d:
        {body}
        print("ready", flush=True)
        time.sleep(120)
""")


def start(what: str, path: Path, body: str = "pass") -> subprocess.Popen:
    """A process that enters ``what(path)`` and sleeps there; returns once it is inside."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(what=what, body=body), str(path)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_second_writer_is_busy(model_dir, tmp_path, capsys):
    dst = tmp_path / "dst"
    holder = start("lock_directory", dst)
    try:
        assert convert(model_dir, dst) == 5
        err = one_error_line(capsys)
        assert f"{dst} is being written by another process (pid {holder.pid}); try again when it finishes" in err
        assert not dst.exists()
    finally:
        kill(holder)
    # The kernel dropped the dead holder's lock: the next writer goes ahead (and removes the stale lock file).
    assert convert(model_dir, dst) == 0
    assert not lock_path_for(dst).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_lock_in_this_process_and_recheck_under_the_lock(model_dir, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "dst"
    with lock_directory(dst):  # a second open of the lock file conflicts even within one process
        assert lock_path_for(dst).read_text().strip() == str(os.getpid())
        assert convert(model_dir, dst) == 5
        assert "being written by another process" in one_error_line(capsys)
        with pytest.raises(BusyError):
            with lock_directory(dst):
                pass
    # Another writer finishing between our first check and our lock: the check is repeated under the lock.
    monkeypatch.setattr(fsutil, "clean_leftovers", lambda path: Path(path).mkdir())
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(dst):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_run_directories_are_locked(tmp_path, capsys):
    from minitron_jax.cli.distill import main as distill_main
    from minitron_jax.cli.pipeline import main as pipeline_main
    from minitron_jax.compress.nas import run_search
    from minitron_jax.pipeline import Pipeline, load_pipeline_config

    run = tmp_path / "run"
    config = Path(__file__).parent.parent / "configs" / "smollm2_135m_demo.yaml"
    with lock_directory(run):
        with pytest.raises(BusyError, match="being written by another process"):
            Pipeline(load_pipeline_config(config, [f"run_dir={run}"])).run()
        assert pipeline_main(["--config", str(config), f"run_dir={run}"]) == 5
        with pytest.raises(BusyError):
            run_search(str(tmp_path / "no-model"), 10, out=run, train_text="x", calib_text="y")
        assert distill_main([f"run_dir={run}", "teacher.path=t", "student.path=s", "data.sources=[d]"]) == 5
        assert "being written by another process" in capsys.readouterr().err.splitlines()[-1]
    assert not run.exists()  # nothing was written by any of them


def test_exports_never_replace_their_run_or_a_foreign_directory(model_dir, tmp_path, capsys):
    from minitron_jax.cli.distill import main as distill_main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    for out, how in ((run, "contains"), (run / "checkpoints" / "x", "lies inside"), (tmp_path, "contains")):
        assert distill_main(["--export-from", str(run), "--out", str(out), "--overwrite"]) == 2
        assert f"{how} the source" in one_error_line(capsys)
    assert distill_main(["--export-from", str(model_dir), "--out", str(model_dir.parent), "--overwrite"]) == 2
    assert "contains the source" in one_error_line(capsys)
    # The export a run makes at its end is checked at its start, not after hours of training.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("x")
    assert distill_main([f"run_dir={tmp_path / 'run2'}", "teacher.path=t", "student.path=s", "data.sources=[d]",
                         f"export.path={foreign}"]) == 2
    assert "was not written by minitron_jax" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "run2").exists() and (foreign / "mine.txt").read_text() == "x"


def test_run_dir_that_is_a_file(tmp_path, capsys):
    from minitron_jax.cli.distill import main as distill_main

    (tmp_path / "run").write_text("not a directory")
    assert distill_main([f"run_dir={tmp_path / 'run'}", "teacher.path=t", "student.path=s",
                         "data.sources=[d]"]) == 2
    assert f"{tmp_path / 'run'} is a file, not a directory" in one_error_line(capsys)
    assert (tmp_path / "run").read_text() == "not a directory"


# ----------------------------------------------------------------------------------------------------------------
# 3. What a killed writer leaves behind
# ----------------------------------------------------------------------------------------------------------------
def test_sigkilled_writer_is_cleaned_up_by_the_next(model_dir, tmp_path):
    dst = tmp_path / "dst"
    writer = start("atomic_directory", dst, body='(d / "part.bin").write_bytes(b"x" * 100000)')
    kill(writer)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[0] == ".dst.lock" and left[1].startswith(".dst.tmp-"), left
    assert convert(model_dir, dst) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_leftovers_removed_and_interrupted_overwrite_restored(tmp_path):
    dst = tmp_path / "dst"
    stale_tmp = tmp_path / ".dst.tmp-abcd1234"
    (stale_tmp / "sub").mkdir(parents=True)
    (stale_tmp / "sub" / "w.bin").write_bytes(b"x")
    old = tmp_path / ".dst.old-zz_99xyz"
    (old / "previous").mkdir(parents=True)
    (old / "previous" / MARKER_NAME).write_text("{}")
    (old / "previous" / "weights").write_text("the only whole copy")
    not_ours = [tmp_path / ".dst.tmp-abcd1234-mine", tmp_path / ".other.tmp-abcd1234", tmp_path / ".dst.tmp-x"]
    for p in not_ours:
        p.mkdir()
    # Killed between "dst → .old/previous" and "staging → dst": the previous directory is put back, so a write
    # without --overwrite finds it; a stale staging directory goes; names that are not ours stay.
    with pytest.raises(FileExistsError):
        with atomic_directory(dst):
            pass
    assert (dst / "weights").read_text() == "the only whole copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["dst"] + [p.name for p in not_ours])
    # With the destination present, a set-aside copy is an old one: removed.
    (old / "previous").mkdir(parents=True)
    with atomic_directory(dst, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (dst / "weights").read_text() == "new" and not old.exists()


def test_failure_between_the_two_renames_puts_the_previous_back(tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    with atomic_directory(dst) as tmp:
        (tmp / "w").write_text("old")
    rename, failed = os.rename, []

    def refuse_once(a, b):
        if Path(b) == dst and not failed:
            failed.append(a)
            raise OSError(errno.ENOSPC, "No space left on device", str(b))
        return rename(a, b)

    monkeypatch.setattr(fsutil.os, "rename", refuse_once)
    with pytest.raises(SystemRefusedError, match=f"disk full writing {dst}"):
        with atomic_directory(dst, overwrite=True) as tmp:
            (tmp / "w").write_text("new")
    assert failed and (dst / "w").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


# ----------------------------------------------------------------------------------------------------------------
# 4. The system refusing the write: one line, exit 6, nothing left
# ----------------------------------------------------------------------------------------------------------------
class FakeSafetensorError(Exception):
    """What safetensors' Rust writer raises: not an OSError, the errno only in the text."""


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   FakeSafetensorError("Error while serializing: I/O error: No space left on "
                                                       "device (os error 28)")])
def test_disk_full_in_convert(model_dir, tmp_path, capsys, monkeypatch, error):
    import safetensors.numpy

    def full(tensors, filename, metadata=None):
        if isinstance(error, OSError):
            error.filename = filename
        raise error

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    dst = tmp_path / "out" / "dst"
    (tmp_path / "out").mkdir()
    assert convert(model_dir, dst) == 6
    err = one_error_line(capsys)
    assert err.startswith(f"error: disk full writing {dst} (No space left on device"), err
    assert ".tmp-" not in err  # the staging name is not shown
    assert list((tmp_path / "out").iterdir()) == []


def test_disk_full_in_prune(model_dir, tmp_path, capsys, monkeypatch):
    import numpy as np

    from minitron_jax.cli import prune as prune_cli
    from minitron_jax.compress import prune

    def full(file, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    monkeypatch.setattr(np, "savez", full)
    out = tmp_path / "out"
    assert prune_cli.main(["--model", str(model_dir), "--out", str(out), "--ffn", "32", "--importance", "random"]) == 6
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: disk full writing {out} (No space left on device: {out / prune.IMPORTANCE_NAME})", err
    assert list(tmp_path.iterdir()) == []


def test_read_only_destination(model_dir, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() != 0:  # root writes through a 0o555 directory: mocked below instead
        parent.chmod(0o555)
        try:
            assert convert(model_dir, parent / "dst") == 6
            assert "permission denied writing" in one_error_line(capsys)
        finally:
            parent.chmod(0o755)

    mkdtemp = fsutil.tempfile.mkdtemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == parent:
            raise OSError(errno.EROFS, "Read-only file system", str(parent))
        return mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(fsutil.tempfile, "mkdtemp", read_only)
    assert convert(model_dir, parent / "dst") == 6
    assert f"read-only file system writing {parent / 'dst'} (Read-only file system: {parent})" in \
        one_error_line(capsys)
    assert list(parent.iterdir()) == []


def test_refusals_that_are_not_ours_pass_through(tmp_path):
    e = OSError(errno.EACCES, "Permission denied", "/some/input/model.safetensors")
    assert fsutil.refused(e, tmp_path / "dst", staging=tmp_path / ".dst.tmp-abcd1234") is None  # names its file
    assert fsutil.refused(ValueError("bad value"), tmp_path) is None
    err = fsutil.refused(ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']"), tmp_path / "ck")
    assert isinstance(err, SystemRefusedError) and str(err).startswith(f"disk full writing {tmp_path / 'ck'}")


# ----------------------------------------------------------------------------------------------------------------
# 5. Shard sizes
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["0", "-1", "nan", "inf", "0.0000001"])
def test_max_shard_size_must_be_sensible(model_dir, tmp_path, capsys, size):
    assert convert(model_dir, tmp_path / "dst", "--max-shard-size", size) == 2
    assert "--max-shard-size must be" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_save_hf_refuses_non_positive_shard_bytes(model_dir, tmp_path):
    from minitron_jax.convert.hf import load_hf_params, save_hf

    config, params = load_hf_params(model_dir)
    for bad in (0, -1, None):
        with pytest.raises(BadInputError, match="max_shard_bytes must be a positive"):
            save_hf(tmp_path / "dst", config, params, max_shard_bytes=bad)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# 6. Single files (a .gguf): check_file_destination, lock_file, atomic_file
# ----------------------------------------------------------------------------------------------------------------
def _starts_with_ours(path: Path) -> bool:
    return path.read_bytes().startswith(b"OURS")


def test_check_file_destination(tmp_path):
    check = fsutil.check_file_destination
    dst = tmp_path / "out.bin"
    assert check(dst) == dst.absolute()  # absent: fine, with or without overwrite
    dst.write_bytes(b"OURS v1")
    with pytest.raises(FileExistsError, match="already exists"):
        check(dst, is_ours=_starts_with_ours)
    assert check(dst, overwrite=True, is_ours=_starts_with_ours) == dst
    assert check(dst, overwrite=True) == dst  # no is_ours: any regular file may be replaced
    notes = tmp_path / "notes.bin"
    notes.write_text("mine")
    with pytest.raises(BadInputError, match="is not an OURS file; refusing to replace it"):
        check(notes, overwrite=True, is_ours=_starts_with_ours, what="an OURS file")
    (tmp_path / "adir").mkdir()
    with pytest.raises(BadInputError, match="is not a file; refusing to replace it"):
        check(tmp_path / "adir", overwrite=True)  # a directory is never replaced by a file
    # Sources: the destination is the source, lies inside it, or is a link to it — refused before anything else.
    with pytest.raises(BadInputError, match="is the source"):
        check(dst, overwrite=True, sources=[dst], is_ours=_starts_with_ours)
    with pytest.raises(BadInputError, match="lies inside the source"):
        check(tmp_path / "adir" / "x.bin", sources=[None, tmp_path / "adir"])
    link = tmp_path / "link.bin"
    link.symlink_to(dst)
    with pytest.raises(BadInputError, match="the source"):
        check(link, overwrite=True, sources=[dst])
    dangling = tmp_path / "dangling.bin"
    dangling.symlink_to(tmp_path / "missing")
    with pytest.raises(FileExistsError):
        check(dangling)
    assert dst.read_bytes() == b"OURS v1" and notes.read_text() == "mine"


def test_lock_file(tmp_path):
    path = tmp_path / "new" / "dir" / "out.bin"
    with fsutil.lock_file(path) as locked:
        assert locked == path.absolute() and path.parent.is_dir()  # the directory is created for the lock file
        assert fsutil.lock_path_for(path).is_file()
        with pytest.raises(BusyError, match=f"{path} is being written by another process \\(pid {os.getpid()}\\)"):
            with fsutil.lock_file(path):
                pass
    assert not fsutil.lock_path_for(path).exists()  # removed on release
    with fsutil.lock_file(path):  # and can be taken again
        pass
    with pytest.raises(BadInputError, match="is a directory, not a file"):
        with fsutil.lock_file(tmp_path / "new"):
            pass


def test_atomic_file_success_replaces_whole(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    old_mask = os.umask(0o022)
    try:
        with fsutil.atomic_file(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.tmp-") and tmp.is_file()
            with open(tmp, "wb") as f:
                f.write(b"new")
            assert path.read_bytes() == b"old"  # nothing visible until the block ends
    finally:
        os.umask(old_mask)
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o644  # the umask, not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_file_fsyncs_before_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    with fsutil.atomic_file(path) as tmp:
        tmp.write_bytes(b"data")
    assert events[:2] == ["fsync", "replace"], events  # the file's data is on disk before its name points at it
    assert path.read_bytes() == b"data"


def test_atomic_file_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with fsutil.atomic_file(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    # A refused write (disk full) becomes one SystemRefusedError naming the destination, not the temporary name.
    with pytest.raises(SystemRefusedError, match=f"disk full writing {path}") as e:
        with fsutil.atomic_file(path) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert ".tmp-" not in str(e.value)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    # An error about another file (an input being read) passes through unchanged.
    with pytest.raises(PermissionError):
        with fsutil.atomic_file(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "input.bin"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_remove_empty_tree_takes_back_only_empty_directories(tmp_path):
    from minitron_jax.fsutil import first_missing, remove_empty_tree

    assert first_missing(tmp_path) is None
    assert first_missing(tmp_path / "a" / "b" / "run") == tmp_path / "a"
    (tmp_path / "a" / "b" / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "a" / "keep" / "x").mkdir(parents=True)
    (tmp_path / "a" / "keep" / "x" / "metrics.jsonl").write_text("{}\n")
    remove_empty_tree(tmp_path / "a")  # a file below keeps its directories and their ancestors; the rest goes
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "a", "a/keep", "a/keep/x", "a/keep/x/metrics.jsonl"]
    (tmp_path / "a" / "keep" / "x" / "metrics.jsonl").unlink()
    remove_empty_tree(tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
    remove_empty_tree(None)
    remove_empty_tree(tmp_path / "absent")


def test_save_npy_reports_a_refused_write_with_its_errno(tmp_path):
    """numpy's own np.save to a path reports a short write without errno ("N requested and M written"), so a full
    disk could not be told from a bug; save_npy's refused write carries the system's errno (here EFBIG from the
    process's file-size limit, which refuses as a full disk does), and the bytes it writes are np.save's."""
    import numpy as np

    a = np.arange(200_000, dtype=np.float32)
    fsutil.save_npy(tmp_path / "ok.npy", a)
    np.save(tmp_path / "ref.npy", a)
    assert (tmp_path / "ok.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    child = textwrap.dedent(f"""
        import errno, resource, numpy as np
        from minitron_jax import fsutil
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        a = np.zeros(100_000, np.float32)
        try:
            np.save({str(tmp_path / 'np.npy')!r}, a)
        except OSError as e:
            print("np.save", e.errno)
        try:
            fsutil.save_npy({str(tmp_path / 'ours.npy')!r}, a)
        except OSError as e:
            print("save_npy", errno.errorcode.get(e.errno))
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["np.save None", "save_npy EFBIG"], out


def test_refusals_that_name_no_file_are_named(tmp_path, monkeypatch):
    """Refused writes whose error names no file, or carries no errno, still become one line naming where the write
    went (exit 6): before, a pipeline on a full disk said just "disk full" (a bare ENOSPC from ``write_text``), or
    printed a traceback for copytree's ``shutil.Error`` and for numpy's errno-less short write."""
    import shutil
    from collections import namedtuple

    # A JSON file written whole or not at all: its name in the message, no temporary file left.
    path = tmp_path / "stages" / "eval.json"
    real_write_text = Path.write_text

    def full(self, *a, **k):
        real_write_text(self, "{", encoding="utf-8")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(SystemRefusedError, match=rf"^disk full writing {path} \(No space left on device\)$"):
        fsutil.write_json_atomic(path, {"a": 1})
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert list((tmp_path / "stages").iterdir()) == []
    # Under a held run directory, a refusal without a file name is named after the directory; one with a name keeps it.
    with pytest.raises(SystemRefusedError, match=rf"^disk full writing {tmp_path / 'run'} "):
        with lock_directory(tmp_path / "run"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError) as e:
        with lock_directory(tmp_path / "run"):
            raise PermissionError(errno.EACCES, "Permission denied", "/etc/elsewhere")
    assert e.value.filename == "/etc/elsewhere"
    # copytree's shutil.Error: an OSError whose errno is only in its text.
    copy_error = shutil.Error([("/src/model.safetensors", str(tmp_path / ".x.tmp-1/model.safetensors"),
                                "[Errno 28] No space left on device: '/src/model.safetensors'")])
    err = fsutil.refused(copy_error, tmp_path / "x", staging=tmp_path / ".x.tmp-1")
    assert str(err) == f"disk full writing {tmp_path / 'x'} (No space left on device)"
    # numpy's short write: a (nearly) full disk is ENOSPC, a finite file-size limit EFBIG, else an I/O error.
    short = OSError("15360 requested and 12304 written")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    assert str(fsutil.refused(short, tmp_path / "m.gguf")).startswith(f"disk full writing {tmp_path / 'm.gguf'}")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 0, 10**9))
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda what: (1 << 16, resource.RLIM_INFINITY))
    assert fsutil.refused(short, tmp_path / "m.gguf").errno == errno.EFBIG
    monkeypatch.setattr(resource, "getrlimit", lambda what: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert fsutil.refused(short, tmp_path / "m.gguf").errno == errno.EIO
    assert fsutil.refused(OSError("something else"), tmp_path / "m.gguf") is None


def test_the_unstarted_writes_of_a_refused_orbax_save_print_nothing_at_exit():
    """When a save fails, Orbax may have built per-fragment write coroutines it never started; Python warned about
    each at interpreter exit ("coroutine ... was never awaited"), after the one-line report (seen in CI). Only
    Orbax's serialization coroutines are silenced: another never-awaited coroutine still warns."""
    script = textwrap.dedent("""
        import sys
        from minitron_jax.fsutil import quiet_refusal_logs
        def async_serialize_from_host():  # the name of Orbax's function (orbax/checkpoint/_src/serialization)
            async def write_fragment():
                pass
            return write_fragment()
        async def ours():
            pass
        if sys.argv[1] == "quiet":
            quiet_refusal_logs()
        left = [async_serialize_from_host(), ours()]
    """)
    def stderr(mode):
        return subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True).stderr

    assert "write_fragment' was never awaited" in stderr("loud")
    quiet = stderr("quiet")
    assert "write_fragment" not in quiet
    assert "coroutine 'ours' was never awaited" in quiet
