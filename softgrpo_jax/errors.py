"""Errors caused by what the user gave (a setting, a file, a prompt) and how the command line reports them.

Every exception the package raises for bad input derives from :class:`UserError` (``ConfigError``,
``CheckpointError``, ``DataFileError``, ``DistributedError``, ...). The ``softgrpo`` command turns one of them, or an
``OSError`` on a file, into a single line ``softgrpo: error: <what, which file or key, what to do>`` and a non-zero
exit code; ``--debug`` (or ``SOFTGRPO_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import errno
import os
import re
import unicodedata

DEBUG_ENV = "SOFTGRPO_DEBUG"


class UserError(Exception):
    """Bad input: a setting, a file, a prompt. The message says what is wrong, where, and what to do, on one line;
    an optional ``detail`` (e.g. the list of every valid key) follows it in ``str(e)`` but not on the command line's
    error line."""

    def __init__(self, message: str = "", *args, detail: str | None = None):
        super().__init__(message, *args)
        self.detail = detail

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        s = super().__str__() if len(self.args) != 1 else self.message
        return f"{s}\n{self.detail}" if self.detail else s


def debug_enabled(environ=None) -> bool:
    """``$SOFTGRPO_DEBUG`` set to anything but 0/off/false/no/"" (the ``--debug`` flag sets it)."""
    v = (os.environ if environ is None else environ).get(DEBUG_ENV, "")
    return v.strip().lower() not in ("", "0", "off", "false", "no")


# bidirectional-text controls reorder what a terminal shows; shown escaped like the C0/C1 control characters
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str, *, keep: str = "\n\t") -> str:
    """``text`` safe to write to a terminal: control characters (ESC and the other C0/C1 codes, DEL), bidi
    overrides and lone surrogates (undecodable bytes) are written as ``\\x1b`` / ``\\u202e`` escapes; the characters
    in ``keep`` (newline and tab by default) stay as they are."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch in keep:
            out.append(ch)
        elif 0xDC80 <= o <= 0xDCFF:  # an undecodable byte kept by Python's surrogateescape (argv, file names)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif unicodedata.category(ch) in ("Cc", "Cs") or ch in _BIDI:
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


_OS_HINTS = {
    errno.ENOSPC: "free some space or choose another folder",
    errno.EDQUOT: "free some space (disk quota) or choose another folder",
    errno.EFBIG: "the file-size limit (ulimit -f) or the file system's limit was reached; raise it or choose "
                 "another folder",
    errno.EACCES: "check the permissions or choose another path",
    errno.EPERM: "check the permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder; give a file",
    errno.EEXIST: "it already exists; choose another path",
}


def os_error_message(e: OSError, action: str = "") -> str:
    """One line for an ``OSError``: ``[action ]PATH: reason; hint``. A message-only OSError keeps its message."""
    if e.errno is None or not e.strerror:
        return str(e)
    where = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    head = " ".join(s for s in (action, str(where)) if s)
    hint = _OS_HINTS.get(e.errno)
    return f"{head + ': ' if head else ''}{e.strerror}" + (f"; {hint}" if hint else "")


# libraries in other languages report an OS error inside their own exception: tensorstore (orbax) "... File too
# large [os_error_code='27']", Rust's std::io (safetensors) "... File too large (os error 27)"
_FOREIGN_OS_ERROR = re.compile(r"os_error_code='?(\d+)|\(os error (\d+)\)")


def os_errno_in(e: BaseException) -> int | None:
    """The OS error number behind ``e``: an OSError's own, or the one tensorstore or Rust wrote into the message."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    m = _FOREIGN_OS_ERROR.search(str(e))
    return int(m.group(1) or m.group(2)) if m else None


def one_line(e: BaseException) -> str:
    """The message of ``e`` as one printable line (what follows ``softgrpo: error:``)."""
    if isinstance(e, UserError):
        msg = e.message or type(e).__name__
    elif isinstance(e, OSError):
        msg = os_error_message(e)
    elif isinstance(e, KeyError) and len(e.args) == 1:
        msg = str(e.args[0])
    else:
        msg = str(e) or type(e).__name__
    msg = " ".join(part.strip() for part in msg.splitlines() if part.strip())
    return printable(msg, keep="")


__all__ = ["UserError", "DEBUG_ENV", "debug_enabled", "printable", "os_error_message", "os_errno_in", "one_line"]
