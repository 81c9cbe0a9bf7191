"""Tools built on the library: ``lp-bench`` (``bench``), ``lp-prune`` (``prune``), the bundled real
model, config-only model shapes and the lm-eval results gate."""

from __future__ import annotations

import os


def check_writable(flag: str, path: str) -> None:
    """Raise ``ValueError`` naming ``flag`` unless the file ``path`` can be written: its folder is made if
    missing (a file in the way, or no permission, is refused) and is writable, and ``path`` is no folder.
    Called before a tool's run, so that its results are never lost to a bad path at the end."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        why = "a file is in its way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
        raise ValueError(
            f"{flag} {path!r}: cannot create its folder {folder!r} ({why}); pass a path in a writable folder"
        ) from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path!r}: its folder {folder!r} is not writable; pass a path in a writable folder")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; pass the path of the file to write")
