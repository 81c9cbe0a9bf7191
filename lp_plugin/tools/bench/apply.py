"""Putting one lp-bench config on a model and taking it off again.

``baseline`` measures the plain model as it is; ``MODE:SPEC:TIER`` attaches lp_plugin to the plain
model (``load=attach``) or loads its own model with ``lp_plugin.from_pretrained`` from the
checkpoint (``load=pretrained``: the path users and lm-eval take), next to the plain one. The peers,
what users would run instead: ``accelerate_cpu`` / ``accelerate_disk`` dispatch the plain model with
Accelerate's own offload to host memory / to its offload folder; ``airllm`` loads AirLLM's model from
the checkpoint (AirLLM splits it into per-module shards once, then streams every module from them).
After a config is taken off, the plain model must be exactly as it was.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import sys
from dataclasses import replace
from typing import Any

from lp_plugin.planning.config import OffloadConfig
from lp_plugin.planning.plugins import tier_class

from .setup import decoder_layers, has_tokenizer, layer_bytes

NOT_APPLICABLE_ON_CPU = (
    "no CUDA device: Accelerate's cpu offload keeps every layer where it computes (the CPU), "
    "so it offloads nothing here"
)
AIRLLM_MISSING = "AirLLM is not installed (pip install airllm)"
ACCELERATE_NF4 = (
    "Accelerate's offload (dispatch_model) cannot offload bitsandbytes 4-bit layers: the Accelerate "
    "peers are measured for bf16/fp16/fp32"
)
AIRLLM_NO_TOKENIZER = (
    "AirLLM loads the checkpoint folder's tokenizer and this one has none (give a checkpoint with "
    "its tokenizer; for a shape, a --tokenizer that lp-bench saves beside its weights)"
)
AIRLLM_NF4 = (
    "AirLLM streams the checkpoint's own dtype (its compression is a format of its own), not bitsandbytes "
    "NF4: measure it with --dtype bf16"
)


class Placement:
    """One config on the model: :meth:`put_on`, measure :attr:`model`, :meth:`take_off`."""

    def __init__(self, base, cfg, offload_root: str, dtype: str):
        self.base = base  # setup.BaseModel
        self.cfg = cfg
        self.device = base.device
        self.offload_root = offload_root
        self.dtype = dtype
        self.model = base.model
        self.handle: Any = None  # lp_plugin's OffloadHandle while an lp config is on
        self.airllm: Any = None  # AirLLM's model wrapper while the airllm config is on
        self.acc_layers: tuple[int, ...] = ()
        self.hf_device_map = None
        self.info: dict[str, Any] = {}

    @property
    def folder(self):
        return os.path.join(self.offload_root, self.cfg.key)

    @property
    def other_bytes(self) -> int:
        """Device bytes that belong to another model than the one measured (the plain model, while a
        ``load=pretrained`` config's own model runs beside it)."""
        return (self.base.device_bytes or 0) if self.loads_own_model else 0

    @property
    def loads_own_model(self) -> bool:
        """Whether the measured model is another object than the plain one (it runs beside it)."""
        return (self.cfg.kind == "lp" and self.cfg.load == "pretrained") or self.cfg.kind == "airllm"

    def not_applicable(self) -> str | None:
        """Why this config measures nothing on this machine, else None."""
        if self.cfg.kind in ("accelerate_cpu", "accelerate_disk") and self.dtype == "nf4":
            return ACCELERATE_NF4
        if self.cfg.kind == "accelerate_cpu" and self.device.type != "cuda":
            return NOT_APPLICABLE_ON_CPU
        if self.cfg.kind == "airllm":
            if importlib.util.find_spec("airllm") is None:
                return AIRLLM_MISSING
            if self.dtype == "nf4":
                return AIRLLM_NF4
            if not has_tokenizer(self.base.checkpoint):
                return AIRLLM_NO_TOKENIZER
        return None

    def put_on(self) -> None:
        cfg = self.cfg
        if cfg.kind == "baseline":
            self.info = {"layers": [], "bytes_per_forward": 0}
        elif cfg.kind in ("accelerate_cpu", "accelerate_disk"):
            self._dispatch_accelerate(cfg.tier)
        elif cfg.kind == "airllm":
            self._load_airllm()
        elif cfg.load == "pretrained":
            self._load_pretrained()
        else:
            import lp_plugin

            self.handle = lp_plugin.attach(self.model, self._options())
            self.info = dict(self.handle.info())

    def _options(self) -> OffloadConfig:
        """The config's OffloadConfig, with this config's folder for a tier that keeps files."""
        options = self.cfg.options
        assert options is not None  # (an lp config always has them)
        if not tier_class(options.tier).needs_folder:
            return options
        os.makedirs(self.folder, exist_ok=True)
        return replace(options, offload_folder=self.folder)

    def _load_pretrained(self) -> None:
        import lp_plugin

        self.model = lp_plugin.from_pretrained(
            self.base.checkpoint, self._options(), main_device=self.device, **self.base.load_kwargs(self.dtype)
        )
        self.handle = lp_plugin.get_handle(self.model)
        self.info = dict(self.handle.info(), load="lp_plugin.from_pretrained")

    def _load_airllm(self) -> None:
        """AirLLM's model from the checkpoint, on this device and dtype; its per-module shards go to this
        config's folder (split once, in the warm-up round). AirLLM prints as it works: to stderr."""
        from lp_plugin.tools.shapes import torch_dtype

        with contextlib.redirect_stdout(sys.stderr):
            import airllm

            self.airllm = airllm.AutoModel.from_pretrained(
                self.base.checkpoint,
                device=str(self.device),
                dtype=torch_dtype(self.dtype),
                layer_shards_saving_path=self.folder,
            )
        self.model = self.airllm.model  # the transformers model AirLLM drives, with its streaming hooks
        total = sum(p.numel() * p.element_size() for p in self.base.model.parameters())
        self.info = {
            "layers": list(range(len(decoder_layers(self.base.model)))),
            "offloaded_bytes": total,
            "bytes_per_forward": total,
            "main_device": str(self.device),
            "load": "airllm.AutoModel.from_pretrained",
            "airllm_version": _version("airllm"),
        }

    def _drop_airllm(self) -> None:
        executor = getattr(self.airllm, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True)
        self.airllm = None
        self.model = self.base.model
        gc.collect()

    def _dispatch_accelerate(self, host: str) -> None:
        from accelerate import dispatch_model

        from lp_plugin import residual_offload_device_map
        from lp_plugin.planning.plan import map_value, resolve_layers

        if any(type(p).__name__ == "Params4bit" for p in self.model.parameters()):
            # dispatch_model dies half-way on bitsandbytes QuantStates ("Tensor.item() cannot be
            # called on meta tensors") and leaves the model unusable: refuse up front
            raise NotImplementedError(
                f"Accelerate's {host} offload (dispatch_model) cannot offload bitsandbytes 4-bit layers; "
                f"{self.cfg.kind} is measured for bf16/fp16/fp32 only"
            )
        layers = decoder_layers(self.model)
        idx = resolve_layers(self.cfg.spec, len(layers))
        main = map_value(self.device)
        device_map = residual_offload_device_map(self.model, offload=self.cfg.spec, tier=host, main_device=self.device)
        sizes = [layer_bytes(layers[i]) for i in idx]
        self.hf_device_map = getattr(self.model, "hf_device_map", None)
        # Accelerate keeps "cpu" weights where they are: put them in (pageable) host memory first,
        # the way a user who loads with this device_map gets them; "disk" layers are written to the
        # offload folder (once: a folder with its index is reused) and read back from it every forward
        for i in idx:
            layers[i].to("cpu")
        self.acc_layers = tuple(idx)
        extra = {"offload_dir": self.folder} if host == "disk" else {}
        dispatch_model(self.model, device_map=device_map, main_device=main, **extra)
        self.info = {
            "layers": list(idx),
            "offloaded_bytes": sum(sizes),
            "bytes_per_forward": sum(sizes),
            "main_device": str(self.device),
        }

    def take_off(self) -> None:
        if self.cfg.kind == "airllm":
            self._drop_airllm()
        elif self.cfg.kind == "lp" and self.cfg.load == "pretrained":
            self.handle = None
            self.model = self.base.model
            gc.collect()  # the loaded model and its tier buffers go now, not at some later collection
        elif self.handle is not None:
            self.handle.detach()
            self.handle = None
        elif self.cfg.kind in ("accelerate_cpu", "accelerate_disk"):
            self._undispatch_accelerate()
        self._check_intact()

    def _undispatch_accelerate(self) -> None:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(self.model, recurse=True)
        layers = decoder_layers(self.model)
        for i in self.acc_layers:
            layers[i].to(self.device)
        if self.hf_device_map is not None:
            self.model.hf_device_map = self.hf_device_map
        elif hasattr(self.model, "hf_device_map"):
            del self.model.hf_device_map
        self.acc_layers = ()

    def _check_intact(self) -> None:
        why = broken(self.base.model, self.device)
        if why:
            raise RuntimeError(f"after taking {self.cfg.name!r} off, the plain model is not intact: {why}")

    def inference(self):
        """The context a user runs a bare loop in: ``lp_plugin.session`` (offloaded layers resident
        in session mode; the GPU ring kept across forwards, with prefetch wrapping into the next
        step, in stream mode). ``generate()`` opens one by itself."""
        if self.cfg.kind == "lp":
            import lp_plugin

            return lp_plugin.session(self.model)
        return contextlib.nullcontext()

    def drop_page_cache(self) -> None:
        """Evict the offload files from the page cache before a timed part (``cold`` configs): the
        tier unmaps what it has mapped (else the pages stay cached) and evicts its files; a peer's files
        (Accelerate's offload folder, AirLLM's shards) are evicted the same way."""
        if not self.cfg.cold:
            return
        if self.handle is not None and hasattr(self.handle.tier, "drop_page_cache"):
            self.handle.tier.drop_page_cache()
        elif self.cfg.kind in ("accelerate_disk", "airllm"):
            evict_folder(self.folder)


def evict_folder(folder: str) -> int:
    """Ask the kernel to drop every file under ``folder`` from the page cache (flushed, then
    ``posix_fadvise`` DONTNEED; pages a live mapping holds stay). Returns how many files were asked."""
    from .storage import evict

    if not hasattr(os, "posix_fadvise"):
        raise RuntimeError("cold configs need posix_fadvise to drop the page cache (Linux)")
    n = 0
    for root, _, files in os.walk(folder):
        for name in files:
            evict(os.path.join(root, name))
            n += 1
    return n


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def broken(model, device):
    """A reason if some parameter of the plain model is not on its device any more, else None."""
    for name, p in model.named_parameters():
        if p.device != device:
            return f"{name} is on {p.device}, not {device}"
    return None
