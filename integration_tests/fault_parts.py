"""Shared parts of the fault tests (test_faults_*.py): a tiny model with its plain logits and state, the
check that a model is plain again, an independent check of a layer file, and a small tmpfs."""

from __future__ import annotations

import contextlib
import hashlib
import pathlib
import subprocess

import pytest
import torch
from conftest import build_tiny

import lp_plugin

PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 7, 128, 64, 1, 33]])
PKG = pathlib.Path(lp_plugin.__file__).parent


def logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(ids).logits


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Tiny:
    """A tiny 8-layer Qwen2 with its plain logits and state dict."""

    def __init__(self, arch="qwen2", seed=0):
        self.model = build_tiny(arch, seed=seed)
        self.ref = logits(self.model)
        self.state = snapshot(self.model)


def assert_unchanged(model, ref, state, tmp_path=None):
    """The model is plain again: no handle, no hooks or wrappers, the same tensors, the same logits,
    and it can be attached (cpu, and disk when a folder is given) and detached again."""
    assert lp_plugin.get_handle(model) is None
    assert "generate" not in model.__dict__ and "forward" not in model.model.__dict__
    for i, layer in enumerate(model.model.layers):
        assert not hasattr(layer, "_hf_hook"), f"layer {i} kept a hook"
        # Accelerate's remove_hook_from_module leaves the original bound forward as an instance attribute
        fwd = layer.__dict__.get("forward")
        assert fwd is None or getattr(fwd, "__func__", None) is type(layer).forward, f"layer {i} kept a replaced forward"
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v) and now[k].device == v.device, k
    assert torch.equal(logits(model), ref)
    tiers = [dict(tier="cpu")]
    if tmp_path is not None:
        tiers.append(dict(tier="disk", offload_folder=tmp_path / "reattach"))
    for kw in tiers:
        handle = lp_plugin.attach(model, offload="even", **kw)
        assert torch.equal(logits(model), ref)
        handle.detach()
    assert torch.equal(logits(model), ref)


def verify_layer_file(path):
    """Independent check of one layer file with the safetensors library: a well-formed header that
    covers the file exactly, one uint8 tensor, a payload hash equal to the fingerprint it records.
    Returns its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["flat"], f"{path}: holds other tensors"
        payload = f.get_tensor("flat")
    assert payload.dtype == torch.uint8 and meta["format"] == "lp_plugin.layer/1"
    assert hashlib.sha256(payload.numpy()).hexdigest() == meta["source_sha256"], f"{path}: payload does not match its fingerprint"
    return meta


def temp_files(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir() if p.name.endswith(".tmp"))


def layer_file(folder, i):
    return pathlib.Path(folder) / f"layer_{i:05d}.safetensors"


def flip_bit(path, offset, bit=0):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([b ^ (1 << bit)]))


@contextlib.contextmanager
def tmpfs(folder, options):
    """Mount a tmpfs on ``folder`` (skip the test with the reason when mounting is not permitted)."""
    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}); needs root with CAP_SYS_ADMIN")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
