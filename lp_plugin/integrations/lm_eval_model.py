"""lm-eval model type ``hf-residual-offload``: lm-eval's ``HFLM`` whose model comes from
:func:`lp_plugin.from_pretrained`, so chosen decoder layers live on the ``cpu`` or ``disk`` tier.

    lm_eval --model hf-residual-offload \\
        --model_args pretrained=PATH,offload=even,tier=disk,mode=stream,alpha=1.0,prefetch=1,offload_folder=DIR \\
        --include_path "$(python -m lp_plugin tasks-path)" --tasks lp_pydoc_ppl --device cuda:0

Every :class:`lp_plugin.OffloadConfig` option is a ``model_arg`` (explicit layer lists use ``;``:
``offload=2;4;6``, because ``,`` separates model_args); ``load_in_4bit=True`` (with the
``bnb_4bit_*`` options) loads NF4; everything else is HFLM's own. Overridden: ``__init__`` (our
options out of the model_args, checked before loading), ``create_from_arg_string``/``create_from_arg_obj``
(a model_arg that is one of lm_eval's own options is refused; in the ``lm_eval`` command an lp_plugin error ends the
run with its message alone, see :func:`short_errors_in_cli`), ``_create_model`` (build through lp_plugin),
``_model_call`` and ``_model_generate`` (count evaluation tokens and time, not batch-size probing), the request
methods (one offload session per request type) and ``get_model_info`` (offload details, VRAM and throughput in
the results JSON under ``config.residual_offload``, and the same as a table at the end of the run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import socket
import sys
import time

import torch
from accelerate.utils import gather_object
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import get_dtype, pad_and_concat
from tqdm import tqdm

import lp_plugin

from ..core import logprobs
from ..core.devices import check_usable, cuda_runtime, normalize_device, parse_device
from ..core.report import jsonable, offload_table
from ..errors import LPPluginError, OffloadSpecError
from ..planning.config import OffloadConfig
from .loading import model_path
from .quant import nf4_config

eval_logger = logging.getLogger(__name__)

MODEL_NAME = "hf-residual-offload"
#: bitsandbytes 4-bit options (turned into a BitsAndBytesConfig)
QUANT_ARGS = ("load_in_4bit", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant", "bnb_4bit_quant_type")
#: lm-eval scoring options of this model type (not engine options)
SCORING_ARGS = ("prefill_chunk", "full_logits")
#: transformers ``from_pretrained`` keywords passed through
HF_EXTRA_ARGS = (
    "attn_implementation",
    "cache_dir",
    "local_files_only",
    "token",
    "use_safetensors",
    "low_cpu_mem_usage",
)
#: HFLM arguments that would fight the engine's placement of the layers
REJECTED_ARGS = {
    "tp_plan": (
        "tensor parallelism is not supported with residual offloading; use parallelize=True (a device map across GPUs)"
    ),
    "peft": "PEFT adapters are not supported with residual offloading yet; merge the adapter first",
    "delta": "delta weights are not supported with residual offloading; merge them first",
    "autogptq": "AutoGPTQ models are not supported with residual offloading",
    "gptqmodel": "GPTQModel models are not supported with residual offloading",
    "gguf_file": "GGUF checkpoints cannot be offloaded directly; convert to a transformers folder first "
    "(for the bundled SmolLM2: pretrained=$(python -m lp_plugin bundled-model))",
    "load_in_8bit": "8-bit bitsandbytes is not supported; use load_in_4bit=True (NF4)",
}
_FALSY_OK = {"autogptq", "gptqmodel", "load_in_8bit"}


def _per_host(ranks: list) -> dict:
    """Host memory for the offloaded layers on each host: what every rank holds privately, plus the copy
    the ranks of that host share counted once."""
    hosts: dict = {}
    for r in ranks:
        h = hosts.setdefault(r.get("host") or "?", {"private": 0, "shared": 0})
        h["private"] += r.get("host_tier_bytes") or 0
        h["shared"] = max(h["shared"], r.get("shared_host_tier_bytes") or 0)
    return {name: h["private"] + h["shared"] for name, h in hosts.items()}


def _hflm_arg_names() -> set:
    params = inspect.signature(HFLM.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def valid_model_args() -> list:
    """Every model_args name ``hf-residual-offload`` accepts."""
    names = _hflm_arg_names() | set(OffloadConfig.names()) | set(QUANT_ARGS) | set(HF_EXTRA_ARGS) | set(SCORING_ARGS)
    return sorted(names - set(REJECTED_ARGS) - {"main_device"})


def _check_args(kwargs: dict) -> None:
    unknown = sorted(k for k in kwargs if k not in valid_model_args() and k not in REJECTED_ARGS)
    if unknown:
        raise OffloadSpecError(
            f"{MODEL_NAME}: unknown model_args {unknown}. Valid model_args: engine options "
            f"{sorted(set(OffloadConfig.names()) - {'main_device'})}, scoring {list(SCORING_ARGS)}, quantization "
            f"{list(QUANT_ARGS)}, transformers "
            f"extras {list(HF_EXTRA_ARGS)}, and HFLM's "
            f"{sorted(_hflm_arg_names() - set(REJECTED_ARGS) - set(OffloadConfig.names()))}"
        )
    for name, why in REJECTED_ARGS.items():
        if name in kwargs and not (name in _FALSY_OK and not kwargs[name]):
            raise OffloadSpecError(f"{MODEL_NAME}: model_args {name}={kwargs[name]!r} is not supported: {why}")


def budget_options(options: dict, hflm_kwargs: dict) -> dict:
    """The engine options of ``options`` (lp_plugin's model_args). ``batch_size`` is HFLM's and stays in
    ``hflm_kwargs``; with ``offload=auto`` the plan also holds HFLM's ``batch_size`` and ``max_length``
    (unless ``max_context`` is given; without either, the longest context up to the model's own that fits:
    ``max_context=auto``) and plans for loglikelihood work unless ``work`` says otherwise."""
    options = dict(options)
    if "batch_size" in options:
        hflm_kwargs["batch_size"] = options.pop("batch_size")
    if str(options.get("offload", "")).strip() != "auto":
        return options
    batch = hflm_kwargs.get("batch_size", 1)
    if not str(batch).strip().isdigit():
        raise OffloadSpecError(
            f"offload=auto plans for a fixed batch size, but batch_size={batch!r} probes ever larger "
            "batches: pass an int batch_size (e.g. --batch_size 4)"
        )
    options["batch_size"] = int(batch)
    if "max_context" not in options:
        options["max_context"] = hflm_kwargs["max_length"] if hflm_kwargs.get("max_length") is not None else "auto"
    options.setdefault("work", "loglikelihood")
    return options


def _positive_int_arg(name: str, value):
    if value is None:
        return None
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise OffloadSpecError(f"{name} must be a whole number of tokens >= 1, got {value!r}")
    return int(text)


_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: lm_eval's own options, passed to every model type beside ``--model_args``
CLI_ARGS = {"batch_size": "--batch_size", "max_batch_size": "--max_batch_size", "device": "--device"}
TRACEBACK_ENV = "LP_PLUGIN_TRACEBACK"  # set to 1: the lm_eval command shows lp_plugin errors with their traceback


def _in_lm_eval_command() -> bool:
    """Whether this process is the ``lm_eval`` command (its console script, or ``python -m lm_eval``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "lm_eval.__main__" in sys.modules or getattr(spec, "name", None) == "lm_eval.__main__"


def short_errors_in_cli() -> None:
    """In the ``lm_eval`` command, an :class:`~lp_plugin.errors.LPPluginError` that ends the run prints its message
    (which names the fix) alone, not under lm_eval's traceback of some fifty lines; any other exception, and every
    error with ``LP_PLUGIN_TRACEBACK=1``, keeps the traceback. Installed once, as the process's ``sys.excepthook``
    (the process is lm_eval's own); in Python (``simple_evaluate``) nothing changes."""
    if not _in_lm_eval_command() or getattr(sys.excepthook, "lp_plugin_short_errors", False):
        return
    previous = sys.excepthook

    def hook(kind, value, tb):
        if isinstance(value, LPPluginError) and os.environ.get(TRACEBACK_ENV, "") in ("", "0"):
            print(
                f"lm_eval --model {MODEL_NAME}: {kind.__name__}: {value}\n"
                f"(the traceback: run again with {TRACEBACK_ENV}=1)",
                file=sys.stderr,
            )
        else:
            previous(kind, value, tb)

    hook.lp_plugin_short_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _check_dtype(value) -> None:
    """A ``dtype`` model_arg lm-eval's ``get_dtype`` turns into a torch float dtype (or ``auto``)."""
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return
    if not isinstance(value, str) or not isinstance(getattr(torch, value, None), torch.dtype):
        raise OffloadSpecError(f"dtype={value!r} is not a torch dtype; use one of {list(_DTYPES)}")


def _check_batch_size(value) -> None:
    """lm-eval's batch sizes: a whole number >= 1, ``auto`` or ``auto:N`` (N >= 1 re-detections)."""
    text = str(value).strip()
    number = text.removeprefix("auto:") if text.startswith("auto:") else text
    if text == "auto" or (number.isascii() and number.isdigit() and int(number) >= 1):
        return
    raise OffloadSpecError(f"--batch_size {value!r}: write a whole number >= 1, 'auto' or 'auto:N'")


def _as_bool(name, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise OffloadSpecError(f"{name} must be True or False, got {value!r}")


def quantization_config(kwargs: dict, dtype):
    """Pop the bitsandbytes model_args and build a 4-bit config (or None)."""
    load = _as_bool("load_in_4bit", kwargs.pop("load_in_4bit", False))
    given = {name: kwargs.pop(name) for name in QUANT_ARGS[1:] if name in kwargs}
    if not load:
        if given:
            raise OffloadSpecError(f"{sorted(given)} only apply with load_in_4bit=True")
        return None
    compute = given.get("bnb_4bit_compute_dtype") or (dtype if dtype not in (None, "auto") else "bfloat16")
    try:
        compute = get_dtype(compute)
    except AttributeError:
        raise OffloadSpecError(
            f"bnb_4bit_compute_dtype={compute!r} is not a torch dtype (use bfloat16, float16 or float32)"
        ) from None
    quant_type = given.get("bnb_4bit_quant_type") or "nf4"
    if quant_type not in ("nf4", "fp4"):
        raise OffloadSpecError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    double = _as_bool("bnb_4bit_use_double_quant", given.get("bnb_4bit_use_double_quant", False))
    return nf4_config(compute, double_quant=double, quant_type=quant_type)


_NO_LOGITS = torch.empty(1, 0, 0)  # what Collator.get_cache expands per cache hit: the scores are ours


@register_model(MODEL_NAME)
class ResidualOffloadLM(HFLM):
    """HFLM whose model comes from :func:`lp_plugin.from_pretrained` (or, for an already built
    ``PreTrainedModel`` passed as ``pretrained``, :func:`lp_plugin.attach`)."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm_eval's ``--model_args`` beside its own options (``--batch_size``, ``--max_batch_size``, ``--device``,
        those given): a model_arg that names one of them is refused naming the option to use."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        short_errors_in_cli()
        given = {k: v for k, v in (additional_config or {}).items() if v is not None}
        clash = sorted(set(arg_dict) & set(given))
        if clash:
            raise OffloadSpecError(
                f"{MODEL_NAME}: model_args {clash} are lm_eval's own options: pass "
                f"{' and '.join(CLI_ARGS.get(k, k) for k in clash)} on the command line instead (in Python, "
                f"{', '.join(f'{k}=' for k in clash)} of simple_evaluate)"
            )
        return cls(**arg_dict, **given)

    def __init__(self, pretrained=None, **kwargs) -> None:
        if pretrained is None:
            raise OffloadSpecError(
                "hf-residual-offload needs the model: --model_args pretrained=PATH_OR_HUB_ID,... (in Python, "
                "pretrained=... among simple_evaluate's model_args)"
            )
        _check_args(kwargs)
        pretrained = model_path(pretrained)
        _check_dtype(kwargs.get("dtype"))
        if kwargs.get("batch_size") is not None:
            _check_batch_size(kwargs["batch_size"])
        if kwargs.get("max_length") is not None:
            kwargs["max_length"] = _positive_int_arg("max_length", kwargs["max_length"])
        if kwargs.get("device") is not None:  # (HFLM's device is where lp_plugin runs the resident part)
            check_usable(
                parse_device(kwargs["device"]), "--device", "--device cpu (in Python, device='cpu' of simple_evaluate)"
            )
        for name in _FALSY_OK:
            kwargs.pop(name, None)  # refused above unless false
        self._lp_prefill_chunk = _positive_int_arg("prefill_chunk", kwargs.pop("prefill_chunk", None))
        # lm-eval's own scoring (full-vocabulary logits): a reference where `--model hf` cannot load the model
        self._lp_full_logits = _as_bool("full_logits", kwargs.pop("full_logits", False))
        if self._lp_full_logits and self._lp_prefill_chunk:
            raise OffloadSpecError(
                "prefill_chunk applies to lp_plugin's scoring; full_logits=True is lm-eval's own: pick one"
            )
        options, kwargs = OffloadConfig.split(kwargs)
        self._lp_length_given = kwargs.get("max_length") is not None
        self._lp_config = OffloadConfig.from_strings(
            budget_options(options, kwargs)
        )  # checked before any weight is read
        self._lp_quant = quantization_config(kwargs, kwargs.get("dtype", "auto"))
        self._lp_stats = dict(tokens=0, forwards=0, forward_s=0.0, eval_s=0.0, sessions=0)
        self._lp_depth = 0
        self._lp_probing = False
        super().__init__(pretrained, **kwargs)
        if lp_plugin.get_handle(self._model) is None:  # a ready PreTrainedModel was passed in
            lp_plugin.attach(self._model, dataclasses.replace(self._lp_config, main_device=self._lp_device()))
        handle = lp_plugin.get_handle(self._model)
        self._lp_config = handle.config  # offload="auto": the planned layers and mode
        budget = handle.plan.budget
        self._lp_length_source = "given" if self._lp_length_given else "the model's"
        if budget is not None:
            if budget.work.kind == "loglikelihood" and not self._lp_length_given:
                self._max_length = budget.work.context  # what the plan holds: max_context, or the longest that fits
                self._lp_length_source = budget.context_source
            if self._lp_prefill_chunk is None:
                self._lp_prefill_chunk = budget.prefill_chunk
        self._lp_mark_standby()
        eval_logger.info(f"{MODEL_NAME}: {jsonable(handle.info())}")

    def _lp_device(self) -> str:
        device = self.accelerator.device if getattr(self, "accelerator", None) is not None else self.device
        return str(normalize_device(device))

    def _create_model(
        self,
        pretrained,
        revision="main",
        dtype="auto",
        trust_remote_code=False,
        quantization_config=None,
        subfolder="",
        parallelize=False,
        gpus=None,
        max_memory_per_gpu=None,
        max_cpu_memory=None,
        **kwargs,
    ) -> None:
        for name in ("offload_folder", "tp_plan", "peft", "delta", "autogptq", "gptqmodel", "gguf_file"):
            kwargs.pop(name, None)  # refused in __init__ when set (offload_folder is ours: in the OffloadConfig)
        config = dataclasses.replace(self._lp_config, main_device=self._lp_device())
        device_map = kwargs.pop("device_map", None)
        if parallelize:
            # HFLM's own placement (device_map="auto" within max_memory_per_gpu/max_cpu_memory) is the base map:
            # each layer computes on the GPU it gives it, and only the chosen layers move to the tier
            placement = self._get_accelerate_args(
                parallelize=True,
                device_map=device_map,
                max_memory_per_gpu=max_memory_per_gpu,
                max_cpu_memory=max_cpu_memory,
                offload_folder=None,
                gpus=gpus,
            )
            device_map, kwargs["max_memory"] = placement["device_map"], placement["max_memory"]
        if device_map is not None:
            kwargs["device_map"] = device_map
            config = dataclasses.replace(config, main_device=None)
        if self._lp_quant is not None:
            if quantization_config is not None:
                raise OffloadSpecError(
                    f"{pretrained} is already quantized ({type(quantization_config).__name__}); drop load_in_4bit"
                )
            quantization_config = self._lp_quant
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        if subfolder:
            kwargs["subfolder"] = subfolder
        self._model = lp_plugin.from_pretrained(
            pretrained, config, revision=revision, dtype=get_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs
        )

    # ------------------------------------------------------------------ measuring
    def _lp_cuda(self):
        device = torch.device(self.device)
        return device if device.type == "cuda" and torch.cuda.is_available() else None

    def _lp_mark_standby(self):
        dev = self._lp_cuda()
        self._lp_standby = None
        if dev is not None:
            torch.cuda.synchronize(dev)
            self._lp_standby = int(torch.cuda.memory_allocated(dev))
            torch.cuda.reset_peak_memory_stats(dev)

    @contextlib.contextmanager
    def _lp_block(self):
        """The outermost request call: timed, and in session mode one offload session for the whole
        block instead of one per forward."""
        self._lp_depth += 1
        if self._lp_depth > 1:
            try:
                yield
            finally:
                self._lp_depth -= 1
            return
        t0 = time.perf_counter()
        try:
            with lp_plugin.session(self._model) if self._lp_config.mode == "session" else contextlib.nullcontext():
                self._lp_stats["sessions"] += self._lp_config.mode == "session"
                yield
        finally:
            self._lp_depth = 0
            self._lp_stats["eval_s"] += time.perf_counter() - t0

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._lp_request(super().loglikelihood, requests, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._lp_request(super().loglikelihood_rolling, requests, disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._lp_request(super().generate_until, requests, disable_tqdm)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        """HFLM's generate, counted as evaluation work: the prompts' tokens and every position generated, one
        forward per decode step."""
        mask = generation_kwargs.get("attention_mask")
        prompt = int(mask.sum()) if isinstance(mask, torch.Tensor) else context.numel()
        with self._lp_timed(prompt, forwards=0) as work:
            out = super()._model_generate(context, max_length, stop, **generation_kwargs)
            steps = out.shape[1] - context.shape[1]
            work["tokens"] += steps * out.shape[0]
            work["forwards"] += steps
        return out

    def _lp_request(self, method, requests, disable_tqdm):
        with self._lp_block():
            out = method(requests, disable_tqdm=disable_tqdm)
        if self.world_size > 1 and getattr(self, "accelerator", None) is not None:
            # every rank runs each request type: collect each rank's figures (rank 0 writes the results)
            self._lp_ranks = gather_object([self._lp_rank_figures()])
        return out

    def _detect_batch_size(self, *args, **kwargs):
        """``--batch_size auto`` probes with forwards of growing batches through the same scoring path as the
        evaluation (:meth:`_model_call` below); the probes are not counted as evaluation work."""
        self._lp_probing = True
        try:
            with self._lp_block():
                return super()._detect_batch_size(*args, **kwargs)
        finally:
            self._lp_probing = False
            self._lp_mark_standby()

    def _model_call(self, inps, attn_mask=None, labels=None):
        """Only lm-eval's batch-size probe calls this for a causal model (scoring goes through
        :meth:`_loglikelihood_tokens`): it gets the logits of one head chunk after a full forward, so the
        probe needs what an evaluation batch needs."""
        if not self._lp_probing or self._lp_full_logits or attn_mask is not None or labels is not None:
            with self._lp_timed(inps.numel()):
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with self._lp_scoring_context():
            head = logprobs.head_of(self.model)
            chunks = logprobs.hidden_chunks(logprobs.decoder_of(self.model), inps, self._lp_prefill_chunk)
            for _, hidden in chunks:  # noqa: B007 - the loop keeps the last chunk's hidden states
                pass  # (the probe needs the forward's memory, not its values)
            rows = logprobs.chunk_rows(head, hidden, self.softmax_dtype)
            return head(hidden.reshape(-1, hidden.shape[-1])[:rows]).unsqueeze(0)

    @contextlib.contextmanager
    def _lp_timed(self, tokens: int, forwards: int = 1):
        """Count ``tokens`` of evaluation work in ``forwards`` forwards and the time they take (synchronized);
        not while probing. Yields the counts, which the caller may raise (a generate call's new tokens)."""
        work = {"tokens": int(tokens), "forwards": forwards}
        if self._lp_probing:
            yield work
            return
        dev = self._lp_cuda()
        t0 = time.perf_counter()
        with self._lp_block():
            yield work
        if dev is not None:
            torch.cuda.synchronize(dev)
        self._lp_stats["forward_s"] += time.perf_counter() - t0
        self._lp_stats["tokens"] += work["tokens"]
        self._lp_stats["forwards"] += work["forwards"]

    def _lp_scoring_context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            )
        )
        return stack

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """HFLM's loop (the same order, batches, truncation, one-token continuation cache and results), with
        each continuation scored from the final hidden states chunk by chunk (:mod:`lp_plugin.core.logprobs`):
        full-vocabulary logits are never materialized."""
        if self.backend != "causal" or self._lp_full_logits:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        re_ord = Collator(
            requests,
            sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])),
            group_by="contexts" if self.logits_cache else None,
            group_fn=lambda req: req[-2] + req[-1][:-1],
        )
        auto = self.batch_size == "auto"
        batch_size = self.batch_size if not auto else override_bs if override_bs is not None else 0
        batch_fn = self._batch_scheduler if auto and len(re_ord) > 0 and not override_bs else None
        if batch_fn is not None:
            self.batch_sizes = {}  # as HFLM: detect again for this set of requests
        res = []
        pbar = tqdm(
            total=len(requests), disable=(disable_tqdm or (self.rank != 0)), desc="Running loglikelihood requests"
        )
        for chunk in re_ord.get_batched(n=batch_size, batch_fn=batch_fn):
            res.extend(self._lp_score_batch(chunk, re_ord, pbar))
        pbar.close()
        return re_ord.get_original(res)

    def _lp_inputs(self, chunk) -> list:
        """Each request's input ids, truncated from the left to ``max_length`` as HFLM does."""
        inps = []
        for _, context_enc, continuation_enc in chunk:
            if not context_enc or not continuation_enc or len(continuation_enc) > self.max_length:
                raise ValueError(
                    f"{MODEL_NAME}: a request needs a non-empty context and a continuation of 1 to "
                    f"max_length={self.max_length} tokens, got {len(context_enc)} and {len(continuation_enc)}"
                )
            total = len(context_enc) + len(continuation_enc)
            if total > self.max_length + 1:
                eval_logger.warning(
                    f"Combined length of context ({len(context_enc)}) and continuation ({len(continuation_enc)}) "
                    f"exceeds model's maximum length ({self.max_length}). "
                    f"Truncating {total - self.max_length + 1} tokens from the left."
                )
            inps.append(
                torch.tensor(
                    (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1],
                    dtype=torch.long,
                    device=self.device,
                )
            )
        return inps

    @staticmethod
    def _lp_sharing(re_ord, context_enc, continuation_enc) -> list:
        """The continuations of every request that lm-eval answers from this request's scores (its
        one-token continuation cache entry), in the order ``Collator.get_cache`` yields them."""
        if re_ord._group_by != "contexts":
            return [continuation_enc]
        return [req[-1] for _, req in re_ord._arr_with_indices[tuple(context_enc + continuation_enc[:-1])]]

    def _lp_score_batch(self, chunk, re_ord, pbar) -> list:
        inps = self._lp_inputs(chunk)
        lengths = [len(inp) for inp in inps]
        width = max(lengths)
        batched = pad_and_concat(width, inps, padding_side="right")  # [batch, width] (pads the list in place)
        # the rows of the [batch * width] positions to score (each continuation's), and at each the tokens of
        # every request sharing it (lm-eval gathers a shorter continuation from the first positions)
        shared = [self._lp_sharing(re_ord, ctx, cont) for _, ctx, cont in chunk]
        k = max(len(s) for s in shared)
        rows, targets = [], []
        for b, ((_, _, cont), length, conts) in enumerate(zip(chunk, lengths, shared)):
            start = b * width + length - len(cont)
            for j in range(len(cont)):
                rows.append(start + j)
                targets.append([c[j] if j < len(c) else 0 for c in conts] + [0] * (k - len(conts)))
        with self._lp_timed(batched.numel()), self._lp_scoring_context():
            values, greedy = logprobs.score_window(
                self.model,
                batched,
                torch.tensor(rows, device=batched.device),
                torch.tensor(targets, dtype=torch.long, device=batched.device),
                self.softmax_dtype,
                self._lp_prefill_chunk,
            )
        out, at = [], 0
        for request_str, ctx, cont in chunk:
            n = len(cont)
            vals, greedy_tokens = values[at : at + n], greedy[at : at + n].unsqueeze(0)  # [n, k], [1, n]
            at += n
            hits = re_ord.get_cache(req_str=request_str, cxt_toks=ctx, cont_toks=cont, logits=_NO_LOGITS)
            for col, (req_str, cont_toks, _) in enumerate(hits):
                length = len(cont_toks)
                cont_t = torch.tensor(cont_toks, dtype=torch.long, device=greedy.device).unsqueeze(0)
                answer = (
                    float(vals[:length, col].reshape(1, length).contiguous().sum()),
                    bool((greedy_tokens[:, -length:] == cont_t).all()),
                )
                out.append(answer)
                if req_str is not None:  # loglikelihood_rolling's windows are cached per document instead
                    self.cache_hook.add_partial("loglikelihood", req_str, answer)
                pbar.update(1)
        return out

    # ------------------------------------------------------------------ reporting
    def _lp_rank_figures(self) -> dict:
        dev, s = self._lp_cuda(), self._lp_stats
        handle = lp_plugin.get_handle(self._model)
        return dict(
            rank=self.rank,
            device=str(dev) if dev is not None else "cpu",
            tokens_processed=s["tokens"],
            forward_seconds=s["forward_s"],
            eval_seconds=s["eval_s"],
            tokens_per_second=s["tokens"] / s["forward_s"] if s["forward_s"] > 0 else None,
            standby_vram_bytes=self._lp_standby,
            peak_inference_vram_bytes=self._lp_peak(dev, handle),
            host=socket.gethostname(),
            host_tier_bytes=handle.tier.host_bytes() if handle is not None else None,
            shared_host_tier_bytes=handle.tier.shared_host_bytes() if handle is not None else None,
        )

    def _lp_peak(self, dev, handle):
        """Peak VRAM of the evaluation: PyTorch's allocations plus the engine's mapped session/ring buffers."""
        if dev is None:
            return None
        return int(torch.cuda.max_memory_allocated(dev)) + (handle.peak_mapped_bytes if handle is not None else 0)

    def _lp_device_peak(self, dev, handle):
        """The card's view of the peak: this process's CUDA runtime (context and kernels), the caching
        allocator's reserved peak and the engine's mapped buffers."""
        if dev is None:
            return None
        _, runtime, _ = cuda_runtime(dev)
        return (
            runtime + int(torch.cuda.max_memory_reserved(dev)) + (handle.peak_mapped_bytes if handle is not None else 0)
        )

    def residual_offload_info(self) -> dict:
        """Offload layout, VRAM and throughput of this run (JSON-ready); under data parallelism, every
        rank's figures and the totals."""
        handle = lp_plugin.get_handle(self._model)
        engine = handle.info() if handle is not None else {}
        dev, s = self._lp_cuda(), self._lp_stats
        info = {
            key: engine.get(key)
            for key in (
                "offload",
                "layers",
                "offloaded_layers",
                "dropped_layers",
                "skipped_layers",
                "stand_ins",
                "tier",
                "mode",
                "alpha",
                "prefetch",
                "offload_folder",
                "offloaded_bytes",
                "embeddings",
                "embeddings_host_bytes",
            )
        }
        info.update(
            max_length=self.max_length,
            max_length_source=self._lp_length_source,
            prefill_chunk=self._lp_prefill_chunk,
            load_in_4bit=self._lp_quant is not None,
            device=str(self.device),
            vram_device=str(dev) if dev is not None else "cpu",
            standby_vram_bytes=self._lp_standby,
            peak_inference_vram_bytes=self._lp_peak(dev, handle),
            peak_device_bytes=self._lp_device_peak(dev, handle),
            tokens_processed=s["tokens"],
            forward_calls=s["forwards"],
            forward_seconds=round(s["forward_s"], 6),
            tokens_per_second=s["tokens"] / s["forward_s"] if s["forward_s"] > 0 else None,
            eval_seconds=round(s["eval_s"], 6),
            tokens_per_second_eval=s["tokens"] / s["eval_s"] if s["eval_s"] > 0 else None,
            sessions_opened=s["sessions"],
            engine=engine,
            engine_stats=dict(handle.stats) if handle is not None else {},
        )
        if dev is None:
            info["note"] = "ran on cpu: no VRAM to report"
        ranks = getattr(self, "_lp_ranks", None)
        if ranks:
            wall = max(r["eval_seconds"] for r in ranks)
            info["ranks"] = ranks
            info["totals"] = {
                "ranks": len(ranks),
                "tokens_processed": sum(r["tokens_processed"] for r in ranks),
                "tokens_per_second": sum(r["tokens_processed"] for r in ranks) / wall if wall > 0 else None,
                "peak_inference_vram_bytes": [r["peak_inference_vram_bytes"] for r in ranks],
                "host_tier_bytes_per_rank": [r["host_tier_bytes"] for r in ranks],
                "host_tier_bytes_per_host": _per_host(ranks),
            }
        return jsonable(info)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["residual_offload"] = self.residual_offload_info()
        if self.rank == 0:
            print(offload_table(info["residual_offload"]), file=sys.stdout, flush=True)
        return info
