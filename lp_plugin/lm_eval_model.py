"""lm-eval model type ``hf-residual-offload``: lm-eval's ``HFLM`` with the model built by
:func:`lp_plugin.from_pretrained`, so chosen decoder layers live on the ``cpu`` or ``disk`` tier.

    lm_eval --model hf-residual-offload \\
        --model_args pretrained=PATH,offload=even,tier=disk,mode=stream,alpha=1.0,prefetch=1 \\
        --include_path "$(python -m lp_plugin tasks-path)" --tasks lp_pydoc_ppl --device cuda:0

Engine options (``model_args``): ``offload`` (``even``/``odd``/``all``/``none``, a range such as
``2-32:2``, or a layer list written with ``;`` or ``+`` because ``,`` separates model_args:
``offload=2;4;6``), ``tier``, ``mode``, ``alpha``, ``offload_folder``, ``prefetch``,
``protect_first``, ``protect_last``. Quantization: ``load_in_4bit=True`` (bitsandbytes NF4;
``bnb_4bit_compute_dtype``, ``bnb_4bit_use_double_quant``, ``bnb_4bit_quant_type``). Everything
else is HFLM's own arguments (``dtype``, ``batch_size``, ``max_length``, ...). Unknown names are
rejected with the list of valid ones.

Only what is needed is overridden: ``__init__`` (argument checking), ``_create_model`` (build
through lp_plugin), ``_model_call`` (token/time accounting), the three request methods (one
offload session per request type in ``mode=session``, so offloaded layers are not reloaded per
forward) and ``get_model_info`` (offload details, VRAM and throughput in the results JSON under
``config.residual_offload``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import get_dtype

from .errors import OffloadSpecError

eval_logger = logging.getLogger(__name__)

MODEL_NAME = "hf-residual-offload"

#: engine options accepted through model_args, with their defaults
ENGINE_DEFAULTS = {
    "offload": "even",
    "tier": "cpu",
    "mode": "session",
    "alpha": 1.0,
    "offload_folder": None,
    "prefetch": 1,
    "protect_first": 2,
    "protect_last": 3,
}
#: bitsandbytes 4-bit options (turned into a BitsAndBytesConfig)
QUANT_ARGS = ("load_in_4bit", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant", "bnb_4bit_quant_type")
#: extra transformers ``from_pretrained`` keywords that are safe to forward
HF_EXTRA_ARGS = ("attn_implementation", "cache_dir", "local_files_only", "token", "use_safetensors", "low_cpu_mem_usage")
#: HFLM arguments that would fight the engine's placement of the layers
REJECTED_ARGS = {
    "parallelize": "the offload engine places every module itself; drop parallelize (multi-GPU comes later)",
    "tp_plan": "tensor parallelism is not supported with residual offloading",
    "device_map": "the offload engine builds the device map; choose layers with offload=... instead",
    "max_memory_per_gpu": "the offload engine builds the device map; choose layers with offload=... instead",
    "max_cpu_memory": "the offload engine builds the device map; choose layers with offload=... instead",
    "peft": "PEFT adapters are not supported with residual offloading yet; merge the adapter first",
    "delta": "delta weights are not supported with residual offloading; merge them first",
    "autogptq": "AutoGPTQ models are not supported with residual offloading",
    "gptqmodel": "GPTQModel models are not supported with residual offloading",
    "gguf_file": "GGUF checkpoints cannot be offloaded directly; convert to a transformers folder first "
    "(for the bundled SmolLM2: pretrained=$(python -m lp_plugin bundled-model))",
    "load_in_8bit": "8-bit bitsandbytes is not supported; use load_in_4bit=True (NF4)",
}
_REJECTED_FALSY_OK = {"parallelize", "autogptq", "gptqmodel", "load_in_8bit"}


def _hflm_arg_names() -> tuple:
    params = inspect.signature(HFLM.__init__).parameters
    return tuple(n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def valid_model_args() -> list:
    """Every model_args name ``hf-residual-offload`` accepts."""
    names = set(_hflm_arg_names()) | set(ENGINE_DEFAULTS) | set(QUANT_ARGS) | set(HF_EXTRA_ARGS)
    return sorted(names - set(REJECTED_ARGS))


def normalize_offload(value):
    """Undo lm-eval's model_args typing for the offload spec: ``offload=none`` arrives as None,
    ``offload=3`` as int 3; ``;``/``+``/spaces separate explicit layers (``,`` separates args)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        raise OffloadSpecError(f"offload={value!r} is not a spec; use a policy name ('even', 'odd', 'all', 'none'), '2;4;6' or '2-32:2'")
    if isinstance(value, int):
        return [value]
    if isinstance(value, float):
        raise OffloadSpecError(f"offload={value!r} is not a layer index; write layers as ints such as offload=3 or offload=2;4;6")
    if isinstance(value, str):
        text = value.strip()
        for sep in (";", "+", " "):
            if sep in text:
                text = ",".join(part for part in text.replace("+", ";").replace(" ", ";").split(";") if part)
                break
        return text
    return value


def _as_int(name, value):
    if isinstance(value, bool):
        raise OffloadSpecError(f"{name} must be an int, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise OffloadSpecError(f"{name} must be an int, got {value!r}")


def _as_bool(name, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise OffloadSpecError(f"{name} must be True or False, got {value!r}")


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return str(value)


@register_model(MODEL_NAME)
class ResidualOffloadLM(HFLM):
    """HFLM whose model comes from :func:`lp_plugin.from_pretrained` (or, for an already built
    ``PreTrainedModel`` passed as ``pretrained``, :func:`lp_plugin.attach`)."""

    def __init__(self, pretrained, **kwargs) -> None:
        unknown = sorted(k for k in kwargs if k not in valid_model_args() and k not in REJECTED_ARGS)
        if unknown:
            raise OffloadSpecError(
                f"{MODEL_NAME}: unknown model_args {unknown}. Valid model_args: engine options "
                f"{sorted(ENGINE_DEFAULTS)}, quantization {list(QUANT_ARGS)}, transformers extras "
                f"{list(HF_EXTRA_ARGS)}, and HFLM's {sorted(set(_hflm_arg_names()) - set(REJECTED_ARGS) - set(ENGINE_DEFAULTS))}"
            )
        for name, why in REJECTED_ARGS.items():
            if name in kwargs:
                value = kwargs[name]
                if name in _REJECTED_FALSY_OK and not value:
                    kwargs.pop(name)
                    continue
                raise OffloadSpecError(f"{MODEL_NAME}: model_args {name}={value!r} is not supported: {why}")

        engine = {name: kwargs.pop(name, default) for name, default in ENGINE_DEFAULTS.items()}
        engine["offload"] = normalize_offload(engine["offload"])
        engine["prefetch"] = _as_int("prefetch", engine["prefetch"])
        engine["protect_first"] = _as_int("protect_first", engine["protect_first"])
        engine["protect_last"] = _as_int("protect_last", engine["protect_last"])
        if engine["offload_folder"] is not None:
            engine["offload_folder"] = str(engine["offload_folder"])
        # cheap checks before any weight is read (the engine checks again, with the model at hand)
        from .specs import validate_alpha, validate_mode, validate_prefetch

        engine["alpha"] = validate_alpha(engine["alpha"])
        engine["mode"] = validate_mode(engine["mode"])
        engine["prefetch"] = validate_prefetch(engine["prefetch"])
        if not isinstance(engine["tier"], str):
            raise OffloadSpecError(f"tier must be a tier name such as 'cpu' or 'disk', got {engine['tier']!r}")

        self._lp_engine = engine
        self._lp_quant = self._quantization_config(kwargs, dtype=kwargs.get("dtype", "auto"))
        self._lp_hf_extra = {name: kwargs.pop(name) for name in HF_EXTRA_ARGS if name in kwargs}
        self._lp_handle = None
        self._lp_standby_bytes = None
        self._lp_tokens = 0
        self._lp_forwards = 0
        self._lp_forward_s = 0.0
        self._lp_eval_s = 0.0
        self._lp_depth = 0
        self._lp_sessions = 0
        self._lp_saved_to = None

        super().__init__(pretrained, **kwargs)

        # HFLM.__init__ would have moved the whole model onto the device (see _create_model)
        self._lp_restore_to()
        if self._lp_handle is None:  # a ready PreTrainedModel was passed in: attach the engine to it
            import lp_plugin

            self._lp_handle = lp_plugin.attach(self._model, **self._lp_engine)
            self._lp_mark_standby()
        info = self._lp_handle.info() if self._lp_handle is not None else {}
        eval_logger.info(f"{MODEL_NAME}: {_jsonable(info)}")

    # ------------------------------------------------------------------ model construction
    @staticmethod
    def _quantization_config(kwargs: dict, dtype):
        """Pop the bitsandbytes model_args and build an NF4 BitsAndBytesConfig (or None)."""
        load_in_4bit = _as_bool("load_in_4bit", kwargs.pop("load_in_4bit", False))
        compute = kwargs.pop("bnb_4bit_compute_dtype", None)
        double = kwargs.pop("bnb_4bit_use_double_quant", None)
        quant_type = kwargs.pop("bnb_4bit_quant_type", None)
        if not load_in_4bit:
            extra = [n for n, v in (("bnb_4bit_compute_dtype", compute), ("bnb_4bit_use_double_quant", double), ("bnb_4bit_quant_type", quant_type)) if v is not None]
            if extra:
                raise OffloadSpecError(f"{extra} only apply with load_in_4bit=True")
            return None
        from transformers import BitsAndBytesConfig

        if compute is None:
            compute = dtype if dtype not in (None, "auto") else "bfloat16"
        try:
            compute_dtype = get_dtype(compute)
        except AttributeError:
            raise OffloadSpecError(f"bnb_4bit_compute_dtype={compute!r} is not a torch dtype (use bfloat16, float16 or float32)") from None
        quant_type = quant_type or "nf4"
        if quant_type not in ("nf4", "fp4"):
            raise OffloadSpecError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=_as_bool("bnb_4bit_use_double_quant", double or False),
        )

    def _lp_main_device(self):
        device = self.accelerator.device if getattr(self, "accelerator", None) is not None else self.device
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return str(device)

    def _create_model(
        self,
        pretrained: str,
        revision: str | None = "main",
        dtype="auto",
        trust_remote_code: bool | None = False,
        parallelize: bool | None = False,
        gpus: int | None = None,
        max_memory_per_gpu=None,
        max_cpu_memory=None,
        offload_folder=None,
        tp_plan=None,
        peft=None,
        delta=None,
        autogptq=False,
        gptqmodel=False,
        gguf_file=None,
        quantization_config=None,
        subfolder: str = "",
        **kwargs,
    ) -> None:
        import lp_plugin

        hf_kwargs = dict(kwargs)
        hf_kwargs.update(self._lp_hf_extra)
        if self._lp_quant is not None:
            if quantization_config is not None:
                raise OffloadSpecError(f"{pretrained} is already quantized ({type(quantization_config).__name__}); drop load_in_4bit")
            quantization_config = self._lp_quant
        if quantization_config is not None:
            hf_kwargs["quantization_config"] = quantization_config
        if subfolder:
            hf_kwargs["subfolder"] = subfolder
        self._model = lp_plugin.from_pretrained(
            pretrained,
            revision=revision,
            dtype=get_dtype(dtype),
            trust_remote_code=trust_remote_code,
            main_device=self._lp_main_device(),
            **self._lp_engine,
            **hf_kwargs,
        )
        self._lp_handle = lp_plugin.get_handle(self._model)
        self._lp_mark_standby()
        # HFLM.__init__ calls self.model.to(self.device) right after this method on GPU machines;
        # the engine has already placed every module (offloaded layers stay on their tier), so
        # that one call must not move anything. The guard is removed again at the end of __init__.
        self._lp_saved_to = ("to" in self._model.__dict__, self._model.__dict__.get("to"))
        model = self._model

        def _keep_placement(*args, **kwargs):
            return model

        model.to = _keep_placement

    def _lp_restore_to(self):
        if self._lp_saved_to is None:
            return
        had, previous = self._lp_saved_to
        self._lp_saved_to = None
        if had:
            self._model.__dict__["to"] = previous
        else:
            self._model.__dict__.pop("to", None)

    def _lp_cuda_device(self):
        device = torch.device(self.device)
        if device.type == "cuda" and torch.cuda.is_available():
            return device
        return None

    def _lp_mark_standby(self):
        dev = self._lp_cuda_device()
        if dev is None:
            self._lp_standby_bytes = None
            return
        torch.cuda.synchronize(dev)
        self._lp_standby_bytes = int(torch.cuda.memory_allocated(dev))
        torch.cuda.reset_peak_memory_stats(dev)

    # ------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def _lp_eval_block(self):
        """Outermost request call: time it and, in session mode, keep the offloaded layers
        resident for the whole block instead of reloading them per forward."""
        if self._lp_depth:
            self._lp_depth += 1
            try:
                yield
            finally:
                self._lp_depth -= 1
            return
        self._lp_depth = 1
        t0 = time.perf_counter()
        try:
            with contextlib.ExitStack() as stack:
                if self._lp_handle is not None and self._lp_engine["mode"] == "session":
                    import lp_plugin

                    stack.enter_context(lp_plugin.session(self._model))
                    self._lp_sessions += 1
                yield
        finally:
            self._lp_depth = 0
            self._lp_eval_s += time.perf_counter() - t0

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        with self._lp_eval_block():
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        with self._lp_eval_block():
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        with self._lp_eval_block():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def _model_call(self, inps, attn_mask=None, labels=None):
        dev = self._lp_cuda_device()
        t0 = time.perf_counter()
        with self._lp_eval_block():
            out = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        if dev is not None:
            torch.cuda.synchronize(dev)
        self._lp_forward_s += time.perf_counter() - t0
        self._lp_tokens += int(inps.numel())
        self._lp_forwards += 1
        return out

    # ------------------------------------------------------------------ reporting
    def residual_offload_info(self) -> dict:
        """Offload layout, VRAM and throughput of this run (JSON-ready)."""
        handle_info = dict(self._lp_handle.info()) if self._lp_handle is not None else {}
        dev = self._lp_cuda_device()
        peak = int(torch.cuda.max_memory_allocated(dev)) if dev is not None else None
        info = {
            "offload": handle_info.get("offload", self._lp_engine["offload"]),
            "layers": handle_info.get("layers"),
            "tier": handle_info.get("tier", self._lp_engine["tier"]),
            "mode": handle_info.get("mode", self._lp_engine["mode"]),
            "alpha": handle_info.get("alpha", self._lp_engine["alpha"]),
            "prefetch": handle_info.get("prefetch", self._lp_engine["prefetch"]),
            "offload_folder": handle_info.get("offload_folder", self._lp_engine["offload_folder"]),
            "offloaded_bytes": handle_info.get("offloaded_bytes"),
            "load_in_4bit": self._lp_quant is not None,
            "device": str(self.device),
            "vram_device": str(dev) if dev is not None else "cpu",
            "standby_vram_bytes": self._lp_standby_bytes,
            "peak_inference_vram_bytes": peak,
            "tokens_processed": self._lp_tokens,
            "forward_calls": self._lp_forwards,
            "forward_seconds": round(self._lp_forward_s, 6),
            "tokens_per_second": (self._lp_tokens / self._lp_forward_s) if self._lp_forward_s > 0 else None,
            "eval_seconds": round(self._lp_eval_s, 6),
            "tokens_per_second_eval": (self._lp_tokens / self._lp_eval_s) if self._lp_eval_s > 0 else None,
            "sessions_opened": self._lp_sessions,
        }
        if dev is None:
            info["note"] = "ran on cpu: no VRAM to report"
        info["engine"] = handle_info
        info["engine_stats"] = dict(getattr(self._lp_handle, "stats", None) or {})
        return _jsonable(info)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["residual_offload"] = self.residual_offload_info()
        return info
