"""Fault table of the offload folder as shared ground.

lp_plugin creates, replaces and deletes only entries it can prove it wrote (its journal, or a
complete file bearing its format mark), opens nothing through a symbolic link, refuses special
files without blocking, never echoes file contents, and reuses a read-only folder of valid files.
Each case sets the folder up, attaches a tiny Qwen2 on the disk tier (layers 2 and 4), and asserts
either the plain model's logits with the expected report, or a specific OffloadFileError with the
model left as it was; then that everything it must not touch is as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest
import torch
from conftest import build_tiny
from fault_parts import layer_file, logits, temp_files, tmpfs, verify_layer_file

import lp_plugin
from lp_plugin.core.tiers.journal import NAME as JOURNAL
from lp_plugin.errors import OffloadFileError

SECRET = b"SECRET-c0ffee-do-not-print\n"
REUSED = {"layer_00002": "reused", "layer_00004": "reused"}
WRITTEN = {"layer_00002": "written", "layer_00004": "written"}


class Ctx:
    """The folders of one case: ``folder`` (the offload folder) and ``outside`` (beside it)."""

    def __init__(self, tmp):
        self.tmp, self.folder, self.outside = tmp, tmp / "off", tmp / "outside"
        self.folder.mkdir()
        self.outside.mkdir()
        self.secret = self.outside / "secret"
        self.secret.write_bytes(SECRET)

    def files(self, seed=0, folder=None):
        """Attach and detach a model once, leaving its layer files (in ``folder``, default the offload folder)."""
        lp_plugin.attach(build_tiny("qwen2", seed=seed), offload="even", tier="disk",
                         offload_folder=folder or self.folder).detach()
        return folder or self.folder


def _same(*pairs):
    """A check that each path still holds its bytes (``None``: still does not exist)."""
    def check():
        for path, data in pairs:
            if data is None:
                assert not os.path.lexists(path), f"{path} was created"
            else:
                assert path.read_bytes() == data, f"{path} was changed"
    return check


# ------------------------------------------------------------------------- setups (return a check)
def _user_temp_files(c):
    mine = [c.folder / ".layer_00002.backup.tmp", c.folder / ".lp_plugin.layer_00002.0123456789abcdef.tmp",
            c.folder / "notes.txt", c.folder / "layer_00002.safetensors.bak"]
    for p in mine:
        p.write_bytes(SECRET)
    return _same(*[(p, SECRET) for p in mine])


def _user_temp_dir(c):
    d = c.folder / ".lp_plugin.layer_00004.00000000deadbeef.tmp"
    d.mkdir()
    (d / "keep").write_bytes(SECRET)
    return _same((d / "keep", SECRET))


def _old_lock_link_to_missing(c):
    (c.folder / ".lp_plugin.lock").symlink_to(c.outside / "created-by-lock")
    return _same((c.outside / "created-by-lock", None))


def _old_lock_link_to_file(c):
    (c.folder / ".lp_plugin.lock").symlink_to(c.secret)
    return _same((c.secret, SECRET))


def _layer_link_to_secret(c):
    layer_file(c.folder, 2).symlink_to(c.secret)
    return _same((c.secret, SECRET))


def _layer_link_dangling(c):
    layer_file(c.folder, 2).symlink_to(c.outside / "new-file")
    return _same((c.outside / "new-file", None))


def _layer_link_to_other_layer(c):
    c.files()
    layer_file(c.folder, 2).unlink()
    layer_file(c.folder, 2).symlink_to(layer_file(c.folder, 4))
    return _same()


def _layer_link_relative_outside(c):
    layer_file(c.folder, 2).symlink_to(os.path.join("..", "outside", "secret"))
    return _same((c.secret, SECRET))


def _layer_fifo(c):
    os.mkfifo(layer_file(c.folder, 2))
    return _same()


def _layer_socket(c):
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(layer_file(c.folder, 2)))
    sock.close()
    return _same()


def _layer_directory(c):
    layer_file(c.folder, 2).mkdir()
    (layer_file(c.folder, 2) / "inside").write_bytes(SECRET)
    return _same((layer_file(c.folder, 2) / "inside", SECRET))


def _user_file_at_layer_path(c):
    layer_file(c.folder, 2).write_bytes(SECRET * 10)
    return _same((layer_file(c.folder, 2), SECRET * 10))


def _user_file_over_ours(c):
    c.files()
    (c.outside / "mine").write_bytes(SECRET * 10)
    os.replace(c.outside / "mine", layer_file(c.folder, 2))  # a new file, not lp_plugin's
    return _same((layer_file(c.folder, 2), SECRET * 10))


def _user_safetensors_at_layer_path(c):
    from safetensors.torch import save_file

    save_file({"flat": torch.zeros(16, dtype=torch.uint8)}, str(layer_file(c.folder, 2)), metadata={"note": SECRET.decode()})
    data = layer_file(c.folder, 2).read_bytes()
    return _same((layer_file(c.folder, 2), data))


def _damaged_lp_plugin_file_from_elsewhere(c):
    elsewhere = c.files(folder=c.tmp / "elsewhere")
    damaged = layer_file(elsewhere, 2).read_bytes()[:-500]
    layer_file(c.folder, 2).write_bytes(damaged)  # lp_plugin's bytes, but not a file it wrote here
    return _same((layer_file(c.folder, 2), damaged))


def _copied_valid_files(c):
    elsewhere = c.files(folder=c.tmp / "elsewhere")
    for i in (2, 4):
        shutil.copy(layer_file(elsewhere, i), layer_file(c.folder, i))
    return _same()


def _copied_stale_files(c):
    elsewhere = c.files(seed=3, folder=c.tmp / "elsewhere")
    for i in (2, 4):
        shutil.copy(layer_file(elsewhere, i), layer_file(c.folder, i))
    return _same()


def _journal_link_to_missing(c):
    (c.folder / JOURNAL).symlink_to(c.outside / "journal")
    return _same((c.outside / "journal", None))


def _journal_link_to_file(c):
    (c.folder / JOURNAL).symlink_to(c.secret)
    return _same((c.secret, SECRET))


def _journal_fifo(c):
    os.mkfifo(c.folder / JOURNAL)
    return _same()


def _journal_directory(c):
    (c.folder / JOURNAL).mkdir()
    return _same()


def _journal_foreign(c):
    (c.folder / JOURNAL).write_bytes(SECRET)
    return _same((c.folder / JOURNAL, SECRET))


def _journal_forged_records(c):
    c.files()
    (c.tmp / "victim.tmp").write_bytes(SECRET)
    with open(c.folder / JOURNAL, "a") as fh:
        for record in ({"reserve": "../victim.tmp"}, {"reserve": "/etc/passwd"}, {"reserve": ["x"]},
                       {"file": "../outside/secret", "dev": 1, "ino": 2}, {"release": 5}, [1], "x" * 50):
            fh.write(json.dumps(record) + "\n")
        fh.write("[" * 100_000 + "\n")
    return _same((c.tmp / "victim.tmp", SECRET), (c.secret, SECRET))


def _journal_torn_last_line(c):
    c.files()
    with open(c.folder / JOURNAL, "a") as fh:
        fh.write('{"reserve": ".lp_plugin.layer_0000')  # a writer killed mid-append
    os.truncate(layer_file(c.folder, 2), 100)  # lp_plugin's own file, damaged: rebuilt (the journal proves it)
    return _same()


def _dead_writer_left_work(c):
    c.files()
    name = ".lp_plugin.layer_00002.0123456789abcdef.tmp"
    (c.folder / name).mkdir()
    (c.folder / name / "layer_00002.safetensors").write_bytes(b"half a file")
    with open(c.folder / JOURNAL, "a") as fh:
        fh.write(json.dumps({"reserve": name}) + "\n")
    return _same((c.folder / name, None))


def _folder_is_a_link(c):
    real = c.tmp / "real"
    real.mkdir()
    c.folder.rmdir()
    c.folder.symlink_to(real)  # the user's own choice of path: followed
    return lambda: verify_layer_file(layer_file(real, 2))


# (case id, setup(ctx) -> check, expected report | (exception, message pattern))
REFUSED_LINK = (OffloadFileError, r"layer 2: .*layer_00002.safetensors is a symbolic link; lp_plugin opens no links in offload_folder")
NOT_OURS = (OffloadFileError, r"layer 2: .*layer_00002.safetensors is not a file lp_plugin wrote \(.*\); lp_plugin replaces only files it can prove it wrote: move it out")
JOURNAL_REFUSED = (OffloadFileError, r"holds \.lp_plugin-owned\.jsonl, .*will not read or replace this one: move it away")
CASES = [
    ("user-temp-and-lookalike-files-kept", _user_temp_files, WRITTEN),
    ("user-lookalike-work-folder-kept", _user_temp_dir, WRITTEN),
    ("old-lock-linked-to-missing-path", _old_lock_link_to_missing, WRITTEN),
    ("old-lock-linked-to-a-file", _old_lock_link_to_file, WRITTEN),
    ("layer-linked-to-secret", _layer_link_to_secret, REFUSED_LINK),
    ("layer-link-dangling", _layer_link_dangling, REFUSED_LINK),
    ("layer-linked-to-other-layer", _layer_link_to_other_layer, REFUSED_LINK),
    ("layer-linked-relative-outside", _layer_link_relative_outside, REFUSED_LINK),
    ("layer-is-a-fifo", _layer_fifo, (OffloadFileError, r"layer_00002.safetensors is a FIFO, not a regular file")),
    ("layer-is-a-socket", _layer_socket, (OffloadFileError, r"layer_00002.safetensors is a socket, not a regular file")),
    ("layer-is-a-directory", _layer_directory, (OffloadFileError, r"layer_00002.safetensors is a directory, not a regular file")),
    ("user-file-at-layer-path", _user_file_at_layer_path, NOT_OURS),
    ("user-file-renamed-over-ours", _user_file_over_ours, NOT_OURS),
    ("user-safetensors-at-layer-path", _user_safetensors_at_layer_path, NOT_OURS),
    ("damaged-lp_plugin-file-not-written-here", _damaged_lp_plugin_file_from_elsewhere, NOT_OURS),
    ("copied-valid-files-reused", _copied_valid_files, REUSED),
    ("copied-stale-files-rebuilt", _copied_stale_files, {"layer_00002": "rebuilt: stale", "layer_00004": "rebuilt: stale"}),
    ("journal-linked-to-missing-path", _journal_link_to_missing, JOURNAL_REFUSED),
    ("journal-linked-to-a-file", _journal_link_to_file, JOURNAL_REFUSED),
    ("journal-is-a-fifo", _journal_fifo, JOURNAL_REFUSED),
    ("journal-is-a-directory", _journal_directory, JOURNAL_REFUSED),
    ("journal-not-lp_plugins", _journal_foreign, JOURNAL_REFUSED),
    ("journal-forged-records-ignored", _journal_forged_records, REUSED),
    ("journal-torn-last-line", _journal_torn_last_line, {"layer_00002": "rebuilt: unreadable", "layer_00004": "reused"}),
    ("dead-writer-work-folder-removed", _dead_writer_left_work, REUSED),
    ("folder-path-is-a-link", _folder_is_a_link, WRITTEN),
]


@pytest.mark.timeout(120)  # a FIFO opened for reading would block here
@pytest.mark.parametrize("setup,expected", [pytest.param(*row[1:], id=row[0]) for row in CASES])
def test_shared_folder(tmp_path, setup, expected):
    c = Ctx(tmp_path)
    check = setup(c)
    temps_before = set(temp_files(c.folder))
    model = build_tiny("qwen2")
    ref = logits(model)
    if isinstance(expected, dict):
        h = lp_plugin.attach(model, offload="even", tier="disk", offload_folder=c.folder)
        assert set(h.tier.report) == set(expected)
        for key, want in expected.items():
            assert h.tier.report[key].startswith(want), h.tier.report
        assert torch.equal(logits(model), ref)
        h.detach()
    else:
        exc, pattern = expected
        with pytest.raises(exc, match=pattern) as info:
            lp_plugin.attach(model, offload="even", tier="disk", offload_folder=c.folder)
        message = str(info.value)
        assert SECRET.decode().strip() not in message
        assert str(int.from_bytes(SECRET[:8], "little")) not in message  # not even as a header length
        assert lp_plugin.get_handle(model) is None
    assert torch.equal(logits(model), ref)
    check()
    assert set(temp_files(c.folder)) <= temps_before  # nothing of lp_plugin's left behind


# ============================================================== read-only folders, and ~
def test_read_only_folder_of_valid_files_is_reused(tmp_path):
    with tmpfs(tmp_path / "ro", "size=4m") as folder:
        model = build_tiny("qwen2")
        ref = logits(model)
        lp_plugin.attach(model, offload="even", tier="disk", offload_folder=folder).detach()
        res = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        h = lp_plugin.attach(model, offload="even", tier="disk", offload_folder=folder)
        assert h.tier.report == REUSED
        assert torch.equal(logits(model), ref)
        h.detach()
        # a missing layer cannot be written there: a clear error, and the model as it was
        with pytest.raises(OffloadFileError, match=r"offload_folder '.*ro' is not writable; pass a writable folder"):
            lp_plugin.attach(model, offload="3", tier="disk", offload_folder=folder)
        assert torch.equal(logits(model), ref)


def test_tilde_in_offload_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = build_tiny("qwen2")
    h = lp_plugin.attach(model, offload="even", tier="disk", offload_folder="~/offload")
    assert h.tier.offload_folder == str(tmp_path / "home" / "offload")
    h.detach()
    assert verify_layer_file(layer_file(tmp_path / "home" / "offload", 2))["layer"] == "layer_00002"
    assert not (tmp_path / "~").exists()


def test_journal_is_compacted_and_still_proves_ownership(tmp_path, monkeypatch):
    import lp_plugin.core.tiers.folder as folder_module

    monkeypatch.setattr(folder_module, "COMPACT_AT", 600)
    folder = tmp_path / "off"
    model = build_tiny("qwen2")
    for step in range(6):  # every attach rewrites both files (the weights move): the journal grows
        with torch.no_grad():
            model.model.layers[2].mlp.up_proj.weight[0, 0] += 1.0
            model.model.layers[4].mlp.up_proj.weight[0, 0] += 1.0
        lp_plugin.attach(model, offload="even", tier="disk", offload_folder=folder).detach()
        assert (folder / JOURNAL).stat().st_size < 600 + 1200, step  # compacted at the next attach
    lines = (folder / JOURNAL).read_text().splitlines()
    assert json.loads(lines[0]) == {"lp_plugin": "owned-files/1"}
    assert temp_files(folder) == []
    os.truncate(layer_file(folder, 2), 4)  # lp_plugin's own file, damaged: still provably its own
    ref = logits(model)
    h = lp_plugin.attach(model, offload="even", tier="disk", offload_folder=folder)
    assert h.tier.report == {"layer_00002": "rebuilt: unreadable (shorter than a safetensors header: truncated or empty)",
                             "layer_00004": "reused"}
    assert torch.equal(logits(model), ref)
    h.detach()
