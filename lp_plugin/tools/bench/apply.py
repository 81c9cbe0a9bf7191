"""Putting one lp-bench config on a model and taking it off again.

``baseline`` measures the plain model as it is; ``MODE:SPEC:TIER`` attaches lp_plugin to the plain
model (``load=attach``) or loads its own model with ``lp_plugin.from_pretrained`` from the
checkpoint (``load=pretrained``: the path users and lm-eval take), next to the plain one;
``accelerate_cpu`` dispatches the plain model with Accelerate's own cpu offload, the peer. After a
config is taken off, the plain model must be exactly as it was.
"""

from __future__ import annotations

import contextlib
import gc
import os

from .setup import decoder_layers, layer_bytes

NOT_APPLICABLE_ON_CPU = ("no CUDA device: Accelerate's cpu offload keeps every layer where it computes (the CPU), "
                         "so it offloads nothing here")


class Placement:
    """One config on the model: :meth:`put_on`, measure :attr:`model`, :meth:`take_off`."""

    def __init__(self, base, cfg, offload_root: str, dtype: str):
        self.base = base  # setup.BaseModel
        self.cfg = cfg
        self.device = base.device
        self.offload_root = offload_root
        self.dtype = dtype
        self.model = base.model
        self.handle = None
        self.acc_layers = ()
        self.hf_device_map = None
        self.info = {}

    @property
    def folder(self):
        return os.path.join(self.offload_root, self.cfg.key)

    @property
    def other_bytes(self) -> int:
        """Device bytes that belong to another model than the one measured (the plain model, while a
        ``load=pretrained`` config's own model runs beside it)."""
        loads_own = self.cfg.kind == "lp" and self.cfg.load == "pretrained"
        return (self.base.device_bytes or 0) if loads_own else 0

    def not_applicable(self) -> str | None:
        """Why this config measures nothing on this machine, else None."""
        if self.cfg.kind == "accelerate_cpu" and self.device.type != "cuda":
            return NOT_APPLICABLE_ON_CPU
        return None

    def put_on(self) -> None:
        cfg = self.cfg
        if cfg.kind == "baseline":
            self.info = {"layers": [], "bytes_per_forward": 0}
        elif cfg.kind == "accelerate_cpu":
            self._dispatch_accelerate()
        elif cfg.load == "pretrained":
            self._load_pretrained()
        else:
            import lp_plugin

            self.handle = lp_plugin.attach(self.model, **self._offload_options())
            self.info = dict(self.handle.info())

    def _offload_options(self) -> dict:
        cfg = self.cfg
        if cfg.tier != "cpu":
            os.makedirs(self.folder, exist_ok=True)
        return dict(offload=cfg.spec, tier=cfg.tier, mode=cfg.mode, alpha=cfg.alpha, prefetch=cfg.prefetch,
                    offload_folder=self.folder if cfg.tier != "cpu" else None, skip=cfg.skip, stand_in=cfg.stand_in,
                    calib=cfg.calib)

    def _load_pretrained(self) -> None:
        import lp_plugin

        self.model = lp_plugin.from_pretrained(self.base.checkpoint, main_device=self.device, **self._offload_options(),
                                               **self.base.load_kwargs(self.dtype))
        self.handle = lp_plugin.get_handle(self.model)
        self.info = dict(self.handle.info(), load="lp_plugin.from_pretrained")

    def _dispatch_accelerate(self) -> None:
        from accelerate import dispatch_model

        from lp_plugin import residual_offload_device_map
        from lp_plugin.planning.plan import map_value, resolve_layers

        if any(type(p).__name__ == "Params4bit" for p in self.model.parameters()):
            # dispatch_model dies half-way on bitsandbytes QuantStates ("Tensor.item() cannot be
            # called on meta tensors") and leaves the model unusable: refuse up front
            raise NotImplementedError(
                "Accelerate's cpu offload (dispatch_model) cannot offload bitsandbytes 4-bit layers; "
                "accelerate_cpu is measured for bf16/fp16/fp32 only"
            )
        layers = decoder_layers(self.model)
        idx = resolve_layers(self.cfg.spec, len(layers))
        main = map_value(self.device)
        device_map = residual_offload_device_map(self.model, offload=self.cfg.spec, tier="cpu", main_device=self.device)
        sizes = [layer_bytes(layers[i]) for i in idx]
        self.hf_device_map = getattr(self.model, "hf_device_map", None)
        # Accelerate keeps "cpu" weights where they are: put them in (pageable) host memory first,
        # the way a user who loads with this device_map gets them
        for i in idx:
            layers[i].to("cpu")
        self.acc_layers = tuple(idx)
        dispatch_model(self.model, device_map=device_map, main_device=main)
        self.info = {"layers": list(idx), "offloaded_bytes": sum(sizes), "bytes_per_forward": sum(sizes),
                     "main_device": str(self.device)}

    def take_off(self) -> None:
        if self.cfg.kind == "lp" and self.cfg.load == "pretrained":
            self.handle = None
            self.model = self.base.model
            gc.collect()  # the loaded model and its tier buffers go now, not at some later collection
        elif self.handle is not None:
            self.handle.detach()
            self.handle = None
        elif self.cfg.kind == "accelerate_cpu":
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
        tier unmaps what it has mapped (else the pages stay cached) and evicts its files."""
        if self.cfg.cold and self.handle is not None and hasattr(self.handle.tier, "drop_page_cache"):
            self.handle.tier.drop_page_cache()


def broken(model, device):
    """A reason if some parameter of the plain model is not on its device any more, else None."""
    for name, p in model.named_parameters():
        if p.device != device:
            return f"{name} is on {p.device}, not {device}"
    return None
