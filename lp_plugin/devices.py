"""Device names: the one place a device spelling becomes a ``torch.device``, and how an Accelerate
device map spells one."""

from __future__ import annotations


def parse_device(device):
    """``device`` (a name such as ``"cuda:0"`` or ``"cpu"``, a GPU index, or a ``torch.device``) as a
    ``torch.device``; an :class:`~lp_plugin.errors.OffloadSpecError` naming the forms otherwise."""
    import torch

    from .errors import OffloadSpecError

    if isinstance(device, int) and not isinstance(device, bool):
        try:
            if device < 0:
                raise ValueError
            return torch.device("cuda", device)
        except (RuntimeError, ValueError, OverflowError):
            raise OffloadSpecError(f"a GPU index must be an int from 0, got {device!r}") from None
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise OffloadSpecError(f"a device must be a name such as 'cuda:0' or 'cpu', or a GPU index, got {device!r}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise OffloadSpecError(f"unknown device {device!r}; write 'cuda', 'cuda:N', 'cpu' or a GPU index N") from None


def normalize_device(device=None):
    """``None`` is the current GPU (or the CPU without one); ``"cuda"`` and a bare index are the
    current/that GPU with its index spelled out."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = parse_device(device)
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
