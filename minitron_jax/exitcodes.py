"""One table of exit codes and one way for every command to turn a failure into a one-line message.

Every ``python -m minitron_jax.<tool>`` ends through :func:`cli_exit`, so the same kind of failure exits with the
same code everywhere (the README's table is this one):

====  =================================================================================================
code  meaning
====  =================================================================================================
0     done
1     an internal error (a bug: the traceback is printed — please report it)
2     bad input: a missing or malformed file, an impossible option or config value, unusable data
3     non-finite numbers: the loss, the parameters or a result became NaN/inf (the last good state is kept)
4     does not fit: a ``--dry-run`` plan needs more memory than the accelerator has
5     busy: another process holds the lock on the destination or run directory
6     the system refused: disk full, read-only file system, permission denied, I/O error
130   interrupted (Ctrl-C / SIGINT); outputs are left whole or absent, never half-written
====  =================================================================================================

Library code raises ordinary exceptions (``ValueError`` subclasses for bad input, ``FileNotFoundError``...) or the
classes here when the kind matters; only the command layer maps them to codes, so a library caller keeps the
exception and its traceback.
"""

from __future__ import annotations

import errno
import functools
import math
import numbers
import sys
import traceback
from collections.abc import Callable
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    BAD_INPUT = 2
    NON_FINITE = 3
    DOES_NOT_FIT = 4
    BUSY = 5
    SYSTEM = 6
    INTERRUPTED = 130


class MinitronError(Exception):
    """Base of the errors whose exit code is fixed by their kind."""

    exit_code: ExitCode = ExitCode.BAD_INPUT


class BadInputError(MinitronError, ValueError):
    """A file, option or config value we cannot use; the message names it."""

    exit_code = ExitCode.BAD_INPUT


class NonFiniteError(MinitronError, ArithmeticError):
    """A loss, parameter or result that is NaN or infinite."""

    exit_code = ExitCode.NON_FINITE


class BusyError(MinitronError, RuntimeError):
    """Another process holds the lock on a destination or run directory."""

    exit_code = ExitCode.BUSY


class SystemRefusedError(MinitronError, OSError):
    """The operating system refused a write (disk full, read-only, permission); the message names the path."""

    exit_code = ExitCode.SYSTEM


# errno values that are the machine's answer, not a bug of ours or a bad argument.
_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EMFILE,
                  errno.ENFILE, errno.EFBIG, errno.ENAMETOOLONG, errno.EXDEV}
_SYSTEM_WORDS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.EIO: "I/O error",
                 errno.EFBIG: "file size limit exceeded"}


def describe_os_error(e: OSError) -> str:
    """``"disk full writing /out/model.safetensors"``-style text: what the system said, and where."""
    what = _SYSTEM_WORDS.get(e.errno or -1) or (e.strerror or str(e))
    where = e.filename if e.filename is not None else None
    if where is not None and e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    return f"{what} ({where})" if where is not None else what


def classify(e: BaseException) -> tuple[ExitCode, str]:
    """The exit code and one-line message for an exception raised out of a command."""
    if isinstance(e, KeyboardInterrupt):
        return ExitCode.INTERRUPTED, "interrupted"
    if isinstance(e, MinitronError):
        msg = str(e)
        if isinstance(e, OSError) and not msg:
            msg = describe_os_error(e)
        return e.exit_code, msg
    if isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)):
        return ExitCode.BAD_INPUT, _one_line(e)
    if isinstance(e, OSError) and e.errno in _SYSTEM_ERRNOS:
        return ExitCode.SYSTEM, describe_os_error(e)
    if isinstance(e, UnicodeDecodeError):
        return ExitCode.BAD_INPUT, f"not UTF-8 text: {e}"
    if isinstance(e, ValueError):
        return ExitCode.BAD_INPUT, _one_line(e)
    return ExitCode.INTERNAL, f"{type(e).__name__}: {e}"


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror and str(e).startswith("["):
        return f"{e.strerror}: {e.filename}"
    return str(e)


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite number (NaN, ±inf) replaced by None, through dicts, lists and tuples.

    JSON has no NaN: ``json.dumps`` would write the non-standard ``NaN``/``Infinity`` that strict readers (jq,
    JavaScript, Go) reject. Reports and logs that may hold a value that could not be computed write it as ``null``
    this way, and dump with ``allow_nan=False`` so nothing slips through; results that *are* the answer (a
    perplexity) refuse instead (:class:`NonFiniteError`)."""
    if hasattr(obj, "tolist") and hasattr(obj, "shape"):  # numpy/JAX arrays and scalars: to Python, then walk
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral) and not math.isfinite(obj):
        return None
    return obj


def cli_exit(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a command's ``main``: failures become ``error: ...`` on stderr and the code from the table.

    A bug (anything not classified above) still prints its traceback, with exit 1: hiding it helps nobody.
    ``SystemExit`` (argparse's usage errors, exit 2) passes through untouched."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return int(main(*args, **kwargs))
        except SystemExit:
            raise
        except BaseException as e:  # noqa: BLE001 - the one place failures become exit codes
            code, msg = classify(e)
            msg = " ".join(msg.split())  # the contract is one line, whatever a library's message looked like
            if code is ExitCode.INTERNAL:
                traceback.print_exc()
            print(f"error: {msg}" if code is not ExitCode.INTERRUPTED else msg, file=sys.stderr, flush=True)
            return int(code)

    return wrapper
