"""Device names: the one place a device spelling becomes a ``torch.device``, and how an Accelerate
device map spells one."""

from __future__ import annotations


def normalize_device(device=None):
    """``None`` is the current GPU (or the CPU without one); ``"cuda"`` and a bare index are the
    current/that GPU with its index spelled out."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        device = torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def map_value(device):
    """How an Accelerate device map spells ``device`` (a GPU index, or ``"cpu"``)."""
    return device.index if device.type == "cuda" else device.type


def main_device_of(model):
    """Where a loaded (or Accelerate-dispatched) model computes: its input embeddings' device."""
    import torch

    emb = model.get_input_embeddings()
    device = emb.weight.device if emb is not None else next(model.parameters()).device
    if device.type == "meta":
        hook = getattr(emb, "_hf_hook", None)
        device = torch.device(getattr(hook, "execution_device", None) or "cpu")
    return normalize_device(device)
