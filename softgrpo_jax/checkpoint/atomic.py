"""Writing a folder all at once, and never over something this project did not write.

:func:`atomic_dir` hands out a temporary folder next to the destination; when the block finishes it becomes the
destination in one rename (the previous export, if any, is removed after the rename), and when the block fails it is
removed and the destination is left as it was. Every export carries a manifest (``softgrpo_export.json``: the files
it wrote). :func:`check_destination` allows an existing destination only when it is an empty folder or such an
export holding nothing else; anything else (a folder of the user's files, a plain file, a link) is refused unless
``overwrite`` is given. Folders are made with the usual permissions (``0777`` less the umask), as ``mkdir`` would.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil

from softgrpo_jax.checkpoint.errors import CheckpointError
from softgrpo_jax.errors import os_error_message

MANIFEST = "softgrpo_export.json"
_TMP_PREFIX, _OLD_PREFIX = ".tmp-", ".old-"


def read_manifest(path: str) -> dict | None:
    """The manifest of an export folder written by this project, or None (no manifest, or not one of ours)."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(man, dict) or man.get("written_by") != "softgrpo_jax" or not isinstance(man.get("files"), list):
        return None
    return man


def _listing(names: list[str], n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_destination(dst: str, *, overwrite: bool = False, fix: str | None = None,
                      source: str | None = None) -> None:
    """Raise CheckpointError unless ``dst`` may be written: it does not exist, is an empty folder, or is an earlier
    export of this project that holds only the files it wrote; with ``overwrite`` anything may be replaced, except
    ``source`` (what is being converted), which ``dst`` must neither be nor hold.
    ``fix``: what the message tells the user to do instead of the default (a new destination or ``--overwrite``)."""
    if source is not None and os.path.lexists(dst):
        src, d = os.path.realpath(source), os.path.realpath(dst)
        if src == d or src.startswith(d.rstrip(os.sep) + os.sep):
            raise CheckpointError(f"cannot write {dst}: it {'is' if src == d else 'holds'} the model being read "
                                  f"({source}), which replacing it would delete; choose a destination outside it")
    parent = os.path.dirname(os.path.abspath(dst))
    p = parent
    while not os.path.exists(p):  # the first existing ancestor must be a folder
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise CheckpointError(f"cannot write {dst}: {p} is a file, not a folder; choose another destination")
    if not os.path.lexists(dst) or overwrite:
        return
    hint = fix or "choose a new destination, or pass --overwrite (overwrite=True) to replace it"
    if os.path.islink(dst):
        raise CheckpointError(f"{dst} already exists and is a symbolic link; {hint}"
                              + ("" if fix else " (the link, not what it points to)"))
    if not os.path.isdir(dst):
        raise CheckpointError(f"{dst} already exists and is a file, not an earlier export; {hint}")
    try:
        entries = os.listdir(dst)
    except OSError as e:
        raise CheckpointError(os_error_message(e, "cannot read the destination")) from None
    if not entries:
        return
    man = read_manifest(dst)
    if man is None:
        raise CheckpointError(f"{dst} already exists and is not an export of softgrpo_jax (it holds "
                              f"{_listing(entries)}); {hint}" + ("" if fix else " and everything in it"))
    extra = set(entries) - set(man["files"]) - {MANIFEST}
    if extra:
        raise CheckpointError(f"{dst} is an earlier export but also holds files it did not write "
                              f"({_listing(list(extra))}); move them out, or " + (fix or (
                                  "choose a new destination, or pass --overwrite (overwrite=True) to replace the "
                                  "folder and everything in it")))


def _unique_dir(parent: str, prefix: str) -> str:
    """Make a new folder ``parent/prefix<random>`` with mode 0777 less the umask (``tempfile.mkdtemp`` uses 0700)."""
    for _ in range(100):
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: could not find a free name for a temporary folder {prefix}*")


def _unused_name(parent: str, prefix: str) -> str:
    for _ in range(100):
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        if not os.path.lexists(path):
            return path
    raise FileExistsError(f"{parent}: could not find a free name {prefix}*")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


@contextlib.contextmanager
def atomic_dir(dst: str, *, overwrite: bool = False, manifest: dict | None = None):
    """Yield a temporary folder next to ``dst``; on success it replaces ``dst`` in one rename.

    ``dst`` is checked first (:func:`check_destination`: an existing destination that is not an earlier export is
    refused unless ``overwrite``). ``manifest``: fields of the ``softgrpo_export.json`` written into the folder (with
    the list of files) that marks it as an export this project may later replace; None writes none (caches).
    An OSError while writing (a full disk, no permission) becomes a CheckpointError naming ``dst``; whatever
    fails, the temporary folder is removed and ``dst`` is left as it was."""
    check_destination(dst, overwrite=overwrite)
    parent = os.path.dirname(os.path.abspath(dst))
    base = os.path.basename(os.path.abspath(dst))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = _unique_dir(parent, f"{_TMP_PREFIX}{base}-")
    except OSError as e:
        raise CheckpointError(os_error_message(e, f"cannot write {dst}:")) from e
    try:
        yield tmp
        if manifest is not None:
            files = sorted(os.listdir(tmp))
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
                json.dump({"written_by": "softgrpo_jax", **manifest, "files": files}, f, indent=1)
        old = None
        if os.path.lexists(dst):
            old = _unused_name(parent, f"{_OLD_PREFIX}{base}-")
            os.rename(dst, old)
            try:
                os.rename(tmp, dst)
            except OSError:
                os.rename(old, dst)  # put the previous one back
                raise
        else:
            os.rename(tmp, dst)
    except OSError as e:
        _remove(tmp)
        raise CheckpointError(f"could not write {dst}: {_reason(e)}; nothing at {dst} was changed") from e
    except BaseException:
        _remove(tmp)
        raise
    if old is not None:
        _remove(old)


def _reason(e: OSError) -> str:
    msg = os_error_message(OSError(e.errno, e.strerror)) if e.errno is not None and e.strerror else str(e)
    return msg


__all__ = ["MANIFEST", "atomic_dir", "check_destination", "read_manifest"]
