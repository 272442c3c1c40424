"""File-system helpers: the modes ``open`` and ``mkdir`` give by default (0666 / 0777 less the umask), for the files
and folders that are first made private by ``mkstemp`` or a library and then become the user's output; and keeping an
earlier output beside a new one."""

from __future__ import annotations

import os


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # (elsewhere: set and restore, the only portable way to read it)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    return 0o666 & ~current_umask()


def set_aside(path: str) -> str:
    """Rename ``path`` (a file or folder) to the first free ``path.N`` (N = 1, 2, ...) and return the new name: an
    earlier result is kept beside the new one rather than overwritten."""
    k = 1
    while os.path.lexists(f"{path}.{k}"):
        k += 1
    os.replace(path, f"{path}.{k}")
    return f"{path}.{k}"


__all__ = ["current_umask", "default_file_mode", "set_aside"]
