"""Tools built on the library: ``lp-bench`` (``bench``), ``lp-prune`` (``prune``), the bundled real
model, config-only model shapes and the lm-eval results gate."""

from __future__ import annotations

import argparse
import difflib
import os


class Parser(argparse.ArgumentParser):
    """The command-line parser of every lp_plugin command (and, through ``add_subparsers``, of its subcommands): no
    abbreviated options (``--offload x`` must not be read as ``--offload-folder x``), and an unknown option refused
    through this parser's usage with the option it was likely meant to be (``--max_memory``: ``--max-memory``)."""

    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.refuse_unknown(unknown)
        return parsed

    def refuse_unknown(self, unknown: list) -> None:
        """Exit 2 naming the unknown words, with a near option for each unknown option that has one (not an
        option it begins: ``--offload`` shares a word with ``--offload-folder``, perhaps nothing more)."""
        known = [o for a in self._actions for o in a.option_strings]
        hints = []
        for word in unknown:
            if word.startswith("-"):
                flag = word.split("=", 1)[0]
                near = difflib.get_close_matches(flag.replace("_", "-"), known, n=1)
                if near and not near[0].startswith(flag + "-"):
                    hints.append(f"{flag}: did you mean {near[0]}?")
        self.error(f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else ""))


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
