"""Safe directory writes: a model, checkpoint or report directory appears whole or not at all, one writer at a time,
and never at the cost of an input or of a directory we did not write.

Every directory :func:`atomic_directory` produces carries a small marker file (``.minitron_jax``); ``overwrite`` may
replace only a directory that has one (or is empty), so ``--overwrite`` can never delete a user's own directory.
A destination that is, contains or lies inside one of the sources is refused outright (``convert sb/model sb
--overwrite`` would otherwise move the input away and delete it).

Writers take an advisory lock (``flock`` on the sibling file ``.<name>.lock``) for the whole write; the training
loop, the pipeline and the NAS hold the same kind of lock on their run directory for the whole run
(:func:`lock_directory`). A second writer gets :class:`~minitron_jax.exitcodes.BusyError` at once instead of
interleaving with the first. Under the lock, the staging directories a killed writer left behind are removed (or the
previous directory restored, when the kill fell between the two renames of an overwrite).

Single files (a ``.gguf``) get the same three pieces: :func:`check_file_destination` (sources, ``overwrite``, and
only a file the caller recognizes as its own kind is replaced), :func:`lock_file` (the same ``.<name>.lock``
sibling) and :func:`atomic_file` (a temporary sibling, fsynced and renamed over ``path`` on success).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from minitron_jax.exitcodes import BadInputError, BusyError, SystemRefusedError, describe_os_error, finite_or_none

MARKER_NAME = ".minitron_jax"
# Checkpoints written before the marker existed carry this file, which only we write: also proof of ownership.
_OWNED_BY = (MARKER_NAME, "minitron_jax.json")
# errno values that mean "the machine refused the write", reported with the destination (exit 6).
REFUSED_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                            errno.EFBIG})
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|os_error_code='(\d+)'|\[Errno (\d+)\]")
# numpy's report of a short C fwrite (ndarray.tofile), which carries no errno: see short_write_errno.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
_ALMOST_FULL = 1 << 20  # bytes: less free than this after a short write is a full disk
_LOCK_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def lock_path_for(path: str | Path) -> Path:
    """The lock file of ``path``: a hidden sibling, so the lock exists before (and without) the directory."""
    path = Path(path).absolute()
    return path.parent / f".{path.name}.lock"


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_outside_sources(dst: Path, sources: Iterable[str | Path | None]) -> None:
    """BadInputError when ``dst`` is, contains or lies inside one of ``sources``."""
    for src in sources:
        if src is None:
            continue
        # Both as written and with symlinks resolved: replacing a directory that holds a link to the source
        # deletes the link (the path the user gave), and one reached through a link deletes the source itself.
        for d, s in ((dst, Path(src).absolute()), (Path(os.path.realpath(dst)), Path(os.path.realpath(src)))):
            if _within(d, s) or _within(s, d):
                how = "is" if d == s else "lies inside" if _within(d, s) else "contains"
                raise BadInputError(f"the destination {dst} {how} the source {src}; refusing to write there "
                                    "(choose a destination outside the source)")


def _free_or_replaceable(path: str | Path, overwrite: bool, sources: Iterable[str | Path | None]) -> Path | None:
    """The checks every destination gets: not a source (nor inside or around one), and not an existing path
    unless ``overwrite``. None when nothing is there yet; the absolute path when something is, to be replaced."""
    dst = Path(path).absolute()
    check_outside_sources(dst, sources)
    if not (dst.exists() or dst.is_symlink()):
        return None
    if not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    return dst


def check_destination(path: str | Path, *, overwrite: bool = False, sources: Iterable[str | Path | None] = ()) -> Path:
    """Refuse a destination that writing to would destroy something: raises, or returns the absolute path.

    Refused: a destination that is, contains or lies inside a source (symlinks resolved); an existing one without
    ``overwrite``; with ``overwrite``, an existing one that is not a directory, or is a non-empty directory without
    our marker. Cheap, so commands call it before minutes of loading; :func:`atomic_directory` calls it again under
    the lock."""
    dst = _free_or_replaceable(path, overwrite, sources)
    if dst is None:
        return Path(path).absolute()
    if not dst.is_dir():
        raise BadInputError(f"{dst} exists and is not a directory; refusing to replace it — remove it yourself or "
                            "choose another path")
    if not any((dst / name).is_file() for name in _OWNED_BY) and any(dst.iterdir()):
        raise BadInputError(f"{dst} exists and was not written by minitron_jax; refusing to replace it — remove it "
                            "yourself or choose another path")
    return dst


def check_file_destination(path: str | Path, *, overwrite: bool = False, sources: Iterable[str | Path | None] = (),
                           is_ours: Callable[[Path], bool] | None = None, what: str = "a file of this kind") -> Path:
    """:func:`check_destination` for a single file: raises, or returns the absolute path.

    Refused: a destination that is, contains or lies inside a source (symlinks resolved); an existing one without
    ``overwrite``; with ``overwrite``, an existing one that is not a regular file (a directory is never replaced by
    a file), or one ``is_ours`` rejects. A file carries no marker of ours, so ``is_ours`` is how the caller proves
    the file is of the kind it writes (a GGUF's magic bytes): ``--overwrite`` then never replaces a user's notes
    that happen to sit at that name. ``what`` names that kind in the messages ("a GGUF file")."""
    dst = _free_or_replaceable(path, overwrite, sources)
    if dst is None:
        return Path(path).absolute()
    if not dst.is_file():
        raise BadInputError(f"{dst} exists and is not a file; refusing to replace it with {what}")
    if is_ours is not None and not is_ours(dst):
        raise BadInputError(f"{dst} exists and is not {what}; refusing to replace it — remove it yourself or "
                            "choose another path")
    return dst


def _existing_ancestor(path: str | Path) -> Path:
    """``path`` or its nearest ancestor that exists: where a file system's free space can be read before the
    directories a writer will create are there."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_bytes(path: str | Path) -> int:
    """The free bytes of the file system ``path`` is (or will be) on."""
    return shutil.disk_usage(_existing_ancestor(path)).free


def tree_bytes(directory: str | Path) -> int:
    """The bytes of the files under ``directory`` (0 where it does not exist; a file removed while walking is
    skipped)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def short_write_errno(path: Path) -> int:
    """The likely errno of a write under ``path`` that numpy reported as a short write without one.

    ``ndarray.tofile`` (used by ``np.save`` to a path and by gguf's writer) writes with C ``fwrite`` and raises
    ``OSError("15360 requested and 12304 written")`` with no errno. A file system with (almost) no room left is a
    full disk (ENOSPC); a finite file-size limit of the process is EFBIG; anything else an I/O error (EIO). Judge it
    before removing the partial file, whose blocks would make the disk look free again."""
    import resource

    with contextlib.suppress(OSError):
        if free_bytes(path) < _ALMOST_FULL:
            return errno.ENOSPC
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return errno.EFBIG
    return errno.EIO


def refusal_errno(e: BaseException) -> int | None:
    """The errno of ``e`` when it is the system refusing a write (disk full, read-only...), else None. Also for
    errors that carry the errno only in their text: "(os error 28)" from Rust (safetensors), "[os_error_code='28']"
    from tensorstore (Orbax), "[Errno 28]" in the list of a ``shutil.Error`` (copytree)."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:  # shutil.Error (copytree) is an OSError whose errno is only in its text
        code = _errno_in_text(str(e))
    return code if code in REFUSED_ERRNOS else None


def _errno_in_text(text: str) -> int | None:
    m = _ERRNO_IN_TEXT.search(text)
    return int(next(g for g in m.groups() if g)) if m else None


class _DropRefusalLogs(logging.Filter):
    """Drops the error records (with tracebacks, from background threads) that Orbax logs for a write the system
    refused: the same failure is raised to the caller and reported there as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and refusal_errno(exc) is not None:
            return False
        return _errno_in_text(record.getMessage()) not in REFUSED_ERRNOS


# Orbax's per-fragment write of a refused save that never started (orbax/checkpoint/_src/serialization).
_UNSTARTED_WRITE = r"coroutine 'async_serialize\w*\.<locals>\.\w+' was never awaited"


def quiet_refusal_logs(logger: str = "absl") -> None:
    """Install :class:`_DropRefusalLogs` on ``logger`` once (Orbax logs through absl), and on asyncio's logger
    ("Task exception was never retrieved" for the writes still in flight when a save failed), and drop the
    "Event loop is closed" errors of those writes' late callbacks (:func:`_drop_late_loop_callbacks`), and the
    "coroutine ... was never awaited" warning of a write Orbax had built but not yet started when the save failed
    (printed at interpreter exit, after the one-line report; only Orbax's serialization coroutines are matched)."""
    for name in (logger, "asyncio"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropRefusalLogs) for f in log.filters):
            log.addFilter(_DropRefusalLogs())
    warnings.filterwarnings("ignore", message=_UNSTARTED_WRITE, category=RuntimeWarning)
    if not getattr(sys.unraisablehook, "_drops_late_loop_callbacks", False):
        sys.unraisablehook = _drop_late_loop_callbacks(sys.unraisablehook)


def _drop_late_loop_callbacks(previous: Callable) -> Callable:
    """An unraisable hook that drops ``RuntimeError('Event loop is closed')`` raised by ``call_soon_threadsafe``.

    When one write of an Orbax save fails (a full disk), the save's event loop ends with that error and is closed
    while tensorstore's other writes are still in flight; each of them then completes into the closed loop, and
    Python printed a traceback per write (37 of them after the one-line "disk full" report, for a 2-layer model).
    The failure itself is raised to the caller and reported once; only those late completions are dropped here.
    Every other unraisable error goes to the previous hook."""

    def hook(unraisable) -> None:
        exc, tb = unraisable.exc_value, unraisable.exc_traceback
        frames = [f.f_code.co_name for f, _ in traceback.walk_tb(tb)] if tb is not None else []
        if (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
                and "call_soon_threadsafe" in frames):
            return
        previous(unraisable)

    hook._drops_late_loop_callbacks = True  # type: ignore[attr-defined]
    return hook


@contextlib.contextmanager
def refusals_named(path: Path, *, unnamed_only: bool = False) -> Iterator[None]:
    """Inside the block, the system refusing a write under ``path`` (disk full, read-only...) surfaces as a one-line
    SystemRefusedError naming ``path`` (exit 6); any other error passes unchanged. With ``unnamed_only``, an
    ``OSError`` that names its own file also passes unchanged (its message already says where)."""
    try:
        yield
    except Exception as e:
        err = None if unnamed_only and isinstance(e, OSError) and e.filename is not None else refused(e, path)
        if err is None:
            raise
        raise err from e


def refused(e: BaseException, path: Path, staging: Path | None = None) -> SystemRefusedError | None:
    """``e`` as a one-line SystemRefusedError naming ``path`` when it is the system refusing a write, else None.

    Also recognizes I/O errors that are not OSError but carry the errno in their text (safetensors, Orbax)."""
    if isinstance(e, SystemRefusedError):
        if staging is None or str(staging) not in str(e):
            return None
        # Raised by a nested write into our staging directory (prune's save_hf): name the real destination.
        err = SystemRefusedError(str(e).replace(str(staging), str(path)))
        err.errno = e.errno
        return err
    code = refusal_errno(e)
    if code is None and isinstance(e, OSError) and e.errno is None and _SHORT_WRITE.fullmatch(str(e)):
        code = short_write_errno(staging or path)
    if code is None:
        return None
    filename = e.filename if isinstance(e, OSError) else None
    if filename is not None and staging is not None and not any(
            _within(Path(os.fsdecode(filename)).absolute(), p) for p in (staging, path)):
        return None  # not the write being refused (reading an input, say): the error already names its file
    what = describe_os_error(OSError(code, os.strerror(code)))
    detail = os.strerror(code)
    if filename is not None:
        shown = str(filename)
        if staging is not None:  # the staging name means nothing to the user: show where it was going
            shown = shown.replace(str(staging), str(path))
        if shown != str(path):
            detail += f": {shown}"
    err = SystemRefusedError(f"{what} writing {path} ({detail})")
    err.errno = code
    return err


def _acquire(lock_file: Path, path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on ``lock_file``; None where the file system has no locks."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise BusyError(f"{path} is being written by another process (pid {pid}); try again when it "
                            "finishes") from None
        except OSError as e:
            os.close(fd)
            if e.errno in _LOCK_UNSUPPORTED:  # e.g. some network file systems: write unlocked rather than never
                warnings.warn(f"cannot lock {lock_file} ({e.strerror}); writing {path} without a lock", stacklevel=3)
                return None
            raise
        # The holder we waited on unlinks its lock file before closing it: if we locked an unlinked file, another
        # process may already hold a fresh one under the same name. Retry on the current file.
        try:
            st, cur = os.fstat(fd), os.stat(lock_file)
            same = (st.st_ino, st.st_dev) == (cur.st_ino, cur.st_dev)
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message the next writer gets
            return fd
        os.close(fd)


@contextlib.contextmanager
def _hold_lock(path: Path) -> Iterator[Path]:
    """Hold ``path``'s lock (its ``.NAME.lock`` sibling; the parent directory is created) for the block; BusyError
    at once for a second holder. The lock file is unlinked while still held (see _acquire), so no lock files pile
    up next to the outputs."""
    lock = lock_path_for(path)
    with refusals_named(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock, path)
    try:
        yield path
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(fd)


def first_missing(path: str | Path) -> Path | None:
    """The outermost of ``path`` and its ancestors that does not exist yet (None when ``path`` exists): what a
    writer about to create ``path`` creates, so what :func:`remove_empty_tree` may take back if it fails."""
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def remove_empty_tree(path: str | Path | None) -> None:
    """Remove ``path`` if it holds nothing but (nested) empty directories: the traces of a run refused before it
    wrote anything (Orbax creates its checkpoint directory on construction). Any file, anywhere below, keeps it
    and its ancestors; only ``rmdir`` is used, so nothing with content can be deleted."""
    if path is None or not Path(path).is_dir():
        return
    for root, _, _ in os.walk(path, topdown=False):
        with contextlib.suppress(OSError):  # not empty (or not ours to remove): kept
            os.rmdir(root)


@contextlib.contextmanager
def lock_directory(path: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of directory ``path`` (which need not exist yet) for the duration of the block.

    A second process asking for the same lock gets BusyError at once (exit 5). ``path`` must be a directory or
    absent (BadInputError otherwise). The lock file is removed on release.

    The block is a run over ``path`` (a training run, a pipeline, a search, one atomic write): a write the system
    refuses there without naming its file (``Path.write_text`` on a full disk raises a bare ENOSPC, reported as
    just "disk full") is reported naming ``path``; an error that names its file keeps its own message."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise BadInputError(f"{path} is a file, not a directory; choose a directory path")
    with _hold_lock(path), refusals_named(path, unnamed_only=True):
        yield path


@contextlib.contextmanager
def lock_file(path: str | Path) -> Iterator[Path]:
    """:func:`lock_directory` for a single file: hold the exclusive lock of file ``path`` (which need not exist yet;
    its directory is created) for the duration of the block. ``path`` must be a file or absent (BadInputError
    otherwise); a second writer gets BusyError at once; the lock file is removed on release."""
    path = Path(path).absolute()
    if path.is_dir():
        raise BadInputError(f"{path} is a directory, not a file; choose a file path")
    with _hold_lock(path):
        yield path


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; best effort (some file systems refuse fsync on a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path (``.NAME.tmp-XXXXXXXX``, an empty file) to write ``path``'s content to; on
    success it is fsynced and renamed over ``path``, so readers see the old file or the whole new one, never a
    half-written one, and a crash right after does not leave an empty file behind the new name. On any exception
    the temporary file is removed and ``path`` is untouched. Close every handle on the temporary file inside the
    block (buffered bytes not yet written are not fsynced). The system refusing a write (disk full, read-only...)
    becomes a SystemRefusedError naming ``path``. Permissions follow the umask (``mkstemp`` would leave 0600).

    No lock and no destination check: pair it with :func:`lock_file` and :func:`check_file_destination`."""
    path = Path(path).absolute()
    with refusals_named(path):
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # fsync flushes the file's data whichever descriptor asks
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException as e:
        err = refused(e, path, staging=tmp)  # before the unlink, which frees the partial file's blocks
        with contextlib.suppress(OSError):
            tmp.unlink()
        if err is None:
            raise
        raise err from e


def _leftovers(path: Path) -> tuple[list[Path], list[Path]]:
    """The staging (``.NAME.tmp-XXXXXXXX``) and set-aside (``.NAME.old-XXXXXXXX``) siblings of ``path``."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    found: dict[str, list[Path]] = {"tmp": [], "old": []}
    with contextlib.suppress(FileNotFoundError):
        for p in path.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m:
                found[m.group(1)].append(p)
    return sorted(found["tmp"]), sorted(found["old"])


def clean_leftovers(path: str | Path) -> list[Path]:
    """Remove what a killed writer of ``path`` left behind; call only under ``path``'s lock (no live owner then).

    A set-aside previous directory is put back when ``path`` is missing (the kill fell between the two renames of an
    overwrite): it is the only whole copy. Returns what was removed."""
    path = Path(path).absolute()
    tmps, olds = _leftovers(path)
    for old in olds:
        previous = old / "previous"
        if (previous.exists() or previous.is_symlink()) and not (path.exists() or path.is_symlink()):
            os.rename(previous, path)
    for p in tmps + olds:
        shutil.rmtree(p, ignore_errors=True)
    return tmps + olds


def write_marker(directory: Path) -> None:
    (directory / MARKER_NAME).write_text(json.dumps({"tool": "minitron_jax", "written": time.time()}) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False,
                     sources: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it is renamed to ``path``.

    On any exception the temporary directory is removed and ``path`` is untouched. With ``overwrite`` an existing
    ``path`` is moved aside first and deleted only after the new one is in place, so there is always one whole
    directory; only a directory we wrote (marker) or an empty one is replaced (see :func:`check_destination`, also
    for ``sources``). The write holds ``path``'s lock throughout (BusyError for a second writer). The system
    refusing a write (disk full, read-only...) becomes a SystemRefusedError naming ``path``. Permissions follow the
    umask (``mkdtemp`` would leave 0700)."""
    sources = list(sources)
    path = check_destination(path, overwrite=overwrite, sources=sources)
    with lock_directory(path):
        clean_leftovers(path)
        check_destination(path, overwrite=overwrite, sources=sources)  # again: another writer may have finished
        with refusals_named(path):
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            yield tmp
            write_marker(tmp)
            mask = _umask()
            for root, dirs, files in os.walk(tmp):
                for d in dirs:
                    os.chmod(os.path.join(root, d), 0o777 & ~mask)
                for f in files:
                    os.chmod(os.path.join(root, f), 0o666 & ~mask)
            os.chmod(tmp, 0o777 & ~mask)
            if path.exists() or path.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.rename(path, old / "previous")
                os.rename(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        except BaseException as e:
            err = refused(e, path, staging=tmp)  # before the removal, which frees the partial files' blocks
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(OSError):  # a failure between the two renames: put the previous one back
                clean_leftovers(path)
            if err is None:
                raise
            raise err from e


class _PlainWriter:
    """Only a ``write`` method, so numpy writes through Python's file object (see :func:`save_npy`)."""

    def __init__(self, f):
        self.write = f.write


def save_npy(path: str | Path, array) -> None:
    """``np.save(path, array)`` to exactly ``path``, where a refused write raises an ``OSError`` with its errno.

    numpy writes a contiguous array to a real file with C ``fwrite`` and reports a short write as ``OSError("354304
    requested and 42944 written")`` with no errno: a full disk then looked like a bug (a traceback, exit 1, seen for
    the teacher-logits writer on a full tmpfs). Through a plain ``write`` method numpy writes 16 MiB chunks with
    Python's own file write, which raises ENOSPC/EDQUOT/EFBIG as the system said."""
    import numpy as np

    with open(path, "wb") as f:
        np.lib.format.write_array(_PlainWriter(f), np.asanyarray(array), allow_pickle=False)


def fmt_bytes(n: float | None) -> str:
    """``"1.52 MB"``: bytes in the largest decimal unit that keeps the number ≥ 1 ("-" for None or non-finite)."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def check_free_space(directory: str | Path, needed: int, what: str, hint: str) -> None:
    """Refuse (SystemRefusedError, exit 6) before writing ``needed`` bytes under ``directory`` when its file system
    has less free, rather than after the work that makes them: "``directory``: ``what`` need 2.10 GB on disk and
    302.50 MB is free; free some space, or ``hint``"."""
    free = free_bytes(directory)
    if free < needed:
        raise SystemRefusedError(f"{directory}: {what} need {fmt_bytes(needed)} on disk and {fmt_bytes(free)} is "
                                 f"free; free some space, or {hint}")


def write_json_atomic(path: Path, data: object) -> None:
    """A small JSON file written to a temporary name and renamed: whole or absent.

    Strict JSON: a NaN/inf number (a metric that could not be computed, e.g. the perplexity of a broken candidate)
    is written as null (``exitcodes.finite_or_none``), never as the ``NaN`` that strict readers reject."""
    text = json.dumps(finite_or_none(data), indent=1, default=_json_default, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with refusals_named(path):  # a full disk names this file (a bare ENOSPC said only "disk full")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _json_default(x):
    import numpy as np

    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")
