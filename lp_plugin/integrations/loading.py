"""``lp_plugin.from_pretrained``: load a checkpoint straight into the offloaded layout.

The model is loaded with the plan's Accelerate device map (resident modules on the main device, the
offloaded layers in host memory), so peak GPU memory while loading is the resident part, never the
whole model; then :func:`lp_plugin.attach` takes the offloaded layers over into their tier and takes
the dispatch hooks off. For the disk tier with a safetensors checkpoint, the offloaded layers are mapped
to Accelerate's "disk" instead: they stay in the checkpoint's files until attach writes each one's layer
file, so host memory never holds more than one layer. 4-bit loads go through
:class:`lp_plugin.integrations.quant.Nf4Load`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os

from ..core.devices import bound_allocator_slack
from ..core.pinning import give_back_collected
from ..errors import OffloadSpecError
from ..planning.config import OffloadConfig
from ..planning.footprint import checkpoint_dtype, load_format
from ..planning.plan import OffloadPlan, auto_base_map
from ..planning.skipping.calib import check_before_loading as check_calib_before_loading
from ..planning.skipping.resolve import known_before_loading
from .checks import check_graph_decode, check_options
from .engine import attach
from .quant import Nf4Load
from .skipped_load import load_without, release

log = logging.getLogger("lp_plugin")

_CONFIG_KWARGS = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only", "gguf_file", "subfolder")


def model_path(name_or_path):
    """``name_or_path`` as a string with a leading ``~`` expanded (transformers would read ``~/m`` as a Hub id); a
    model given as a local path (a path object, or a string starting with ``/``, ``.`` or ``~``: no Hub id does)
    that does not exist is refused, before transformers reads it as a Hub id and says so."""
    local = isinstance(name_or_path, os.PathLike)
    if local:
        name_or_path = os.fspath(name_or_path)  # (lm-eval takes anything but a str for a built model)
    if not isinstance(name_or_path, str):
        return name_or_path
    if name_or_path.startswith("~"):
        name_or_path = os.path.expanduser(name_or_path)
    if (local or name_or_path.startswith(("/", "."))) and not os.path.exists(name_or_path):
        raise OffloadSpecError(
            f"model {name_or_path!r}: no such folder; pass a folder that holds the model's config.json, "
            "or a Hub id such as owner/name"
        )
    return name_or_path


def from_pretrained(name_or_path, config: OffloadConfig | None = None, **kwargs):
    """Load ``name_or_path`` with ``AutoModelForCausalLM`` into the offloaded layout and attach.

    lp_plugin's options (:class:`OffloadConfig`: ``offload``, ``tier``, ``mode``, ``alpha``,
    ``offload_folder``, ``prefetch``, ``main_device``, ...) are taken out of ``kwargs``; the rest goes
    to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``quantization_config``,
    ``attn_implementation``, ...). ``device_map`` (``"auto"`` with ``max_memory``, or a dict) is kept as
    the base placement: each layer computes where it puts it, and only the chosen layers move to the
    tier. Without one, everything resident goes on ``main_device`` (default: the current GPU if there
    is one, else the CPU). Returns the model; its handle is ``lp_plugin.get_handle(model)``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    options, hf_kwargs = OffloadConfig.split(kwargs)
    config = OffloadConfig.from_options(config, **options)  # fail fast, before any weight is read
    check_options(config, name_or_path)
    name_or_path = model_path(name_or_path)
    base_map = hf_kwargs.pop("device_map", None)  # (max_memory is an OffloadConfig option: config.max_memory)
    if not (base_map is None or base_map == "auto" or isinstance(base_map, dict)):
        raise OffloadSpecError(
            f"device_map={base_map!r}: lp_plugin keeps a base placement given as 'auto' (with max_memory) "
            "or as a dict {module: device}"
        )
    if hf_kwargs.get("output_loading_info"):
        raise OffloadSpecError(
            "output_loading_info=True is not supported: lp_plugin.from_pretrained returns the model alone; "
            "for transformers' loading report, call AutoModelForCausalLM.from_pretrained(..., output_loading_info=True)"
        )
    hf_config = AutoConfig.from_pretrained(name_or_path, **{k: hf_kwargs[k] for k in _CONFIG_KWARGS if k in hf_kwargs})
    _check_near_misses(hf_config, hf_kwargs)
    _apply_config_overrides(hf_config, hf_kwargs)  # (num_hidden_layers=6 and the like: the plan must see them)
    # a model dropped without detach is a reference cycle (model, handle, hooks) that only a collection frees:
    # collected now, before the budget reads free memory and before this model takes the place it held
    gc.collect()
    give_back_collected()  # (the pages such a model had lent to CUDA)
    if base_map == "auto":
        base_map = auto_base_map(
            hf_config, _accelerate_max_memory(config.max_memory), checkpoint_dtype(hf_config, hf_kwargs)
        )
    plan = OffloadPlan.for_config(hf_config, config, base_map=base_map, weights=load_format(hf_config, hf_kwargs))
    check_graph_decode(plan, plan.config)
    early = known_before_loading(plan.config, plan.num_layers)
    if early is not None:  # an explicit skip without stand-ins: those layers are never read
        plan = plan.with_resolved_skips(early)
    else:  # a policy or stand-ins read calibration text once the model is loaded: check it can before loading
        check_calib_before_loading(hf_config, plan.config.calib)
    nf4 = Nf4Load(hf_config, plan, hf_kwargs)
    if plan.budget is not None and plan.main_device.type == "cuda":
        bound_allocator_slack()  # see docs/card.md: the card's allocator slack stays small
    host = "disk" if _layers_stay_on_disk(name_or_path, plan, nf4, hf_kwargs) else "cpu"
    device_map = nf4.device_map(plan.device_map(host))

    def load(device_map):
        if early is not None and early.layers:
            kw = {"device_map": device_map, **nf4.hf_kwargs}
            return load_without(type(plan.skeleton), name_or_path, plan.layer_prefix, early.layers, **kw)
        return AutoModelForCausalLM.from_pretrained(name_or_path, device_map=device_map, **nf4.hf_kwargs)

    try:
        with _without_meta_note():
            model = load(device_map)
    except ValueError as exc:
        # weights transformers converts while loading (fused MoE experts) must be saved again to be offloaded to
        # "disk", in a folder of its own: such a model loads its offloaded layers into host memory instead
        if host != "disk" or "offload_folder" not in str(exc):
            raise
        log.info("lp_plugin: %s: offloaded layers load into host memory (%s)", name_or_path, exc)
        with _without_meta_note():
            model = load(nf4.device_map(plan.device_map("cpu")))
    model.eval()
    nf4.finish(model)
    if early is None:
        # a policy or stand-ins: chosen and fitted on the whole loaded model, then the skipped layers are freed
        plan = plan.with_skips(model)
        release(model, plan.skips.layers, plan.main_device)
    attach(model, plan=plan)
    if plan.budget is not None and plan.main_device.type == "cuda":
        import torch

        # loading (NF4 quantizes on the device) leaves blocks in PyTorch's cache that the work's larger
        # activations cannot reuse; a plan for the card gives them back to the device
        torch.cuda.empty_cache()
    return model


class _MetaNote(logging.Filter):
    """Accelerate's warning that offloaded parameters are on the meta device: true while it loads, not once
    attach has given every layer its tier (what lp_plugin's own log line then says)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Some parameters are on the meta device")


@contextlib.contextmanager
def _without_meta_note():
    logger, note = logging.getLogger("accelerate.big_modeling"), _MetaNote()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


# transformers' own loading arguments (never a misspelt lp_plugin option)
_HF_LOADING = frozenset(
    {
        *_CONFIG_KWARGS,
        "config",
        "state_dict",
        "device_map",
        "max_memory",
        "offload_state_dict",
        "offload_buffers",
        "low_cpu_mem_usage",
        "variant",
        "use_safetensors",
        "weights_only",
        "key_mapping",
        "tp_plan",
        "tp_size",
        "device_mesh",
        "adapter_name",
        "adapter_kwargs",
        "generation_config",
        "force_download",
        "proxies",
        "output_loading_info",
        "ignore_mismatched_sizes",
        "distributed_config",
    }
)


def _check_near_misses(hf_config, hf_kwargs: dict) -> None:
    """A keyword that is neither transformers' nor a config attribute, and is spelt nearly like one of lp_plugin's
    options (``protect_frist``), is refused naming the option: transformers would refuse it later, without saying
    which lp_plugin option was meant."""
    import difflib

    for key in hf_kwargs:
        if key in _HF_LOADING or key in _NOT_OVERRIDES or hasattr(hf_config, key):
            continue
        close = difflib.get_close_matches(key, OffloadConfig.names(), n=1, cutoff=0.8)
        if close:
            raise OffloadSpecError(
                f"from_pretrained got {key}=..., which is neither lp_plugin's nor transformers'; did you mean "
                f"lp_plugin's {close[0]}=? (lp_plugin's options: {list(OffloadConfig.names())})"
            )


# loading arguments of transformers' from_pretrained that are also config attributes: never config overrides
_NOT_OVERRIDES = frozenset({"dtype", "torch_dtype", "quantization_config", "attn_implementation", "device_map"})


def _apply_config_overrides(hf_config, hf_kwargs: dict) -> None:
    """The config attributes given to ``from_pretrained`` (transformers passes the keywords it does not
    take itself to the config: ``num_hidden_layers=6``), set on ``hf_config`` so the plan is made for
    the model that will be built."""
    for key, value in hf_kwargs.items():
        if key not in _NOT_OVERRIDES and key not in _CONFIG_KWARGS and hasattr(hf_config, key):
            setattr(hf_config, key, value)


def _layers_stay_on_disk(name_or_path, plan, nf4: Nf4Load, hf_kwargs: dict) -> bool:
    """The offloaded layers can load as Accelerate's "disk" (read from the checkpoint's own files when
    attach packs them): a disk tier, a checkpoint in safetensors, nothing to quantize on the way."""
    if plan.config.tier != "disk" or not plan.offloaded or nf4.active or hf_kwargs.get("use_safetensors") is False:
        return False
    if hf_kwargs.get("variant") is not None:  # (its files may be .bin beside a safetensors default)
        return False
    if hf_kwargs.get("quantization_config") is not None or hf_kwargs.get("gguf_file") is not None:
        return False
    from transformers.utils import cached_file

    lookup = {
        k: hf_kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only", "subfolder") if k in hf_kwargs
    }
    for name in ("model.safetensors.index.json", "model.safetensors"):
        try:
            found = cached_file(
                name_or_path,
                name,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **lookup,
            )
        except OSError:
            found = None
        if found is not None:
            return True
    return False


def _accelerate_max_memory(max_memory):
    """A parsed ``max_memory`` as Accelerate's ``{device: bytes}`` (None stays None)."""
    if max_memory is None:
        return None
    if any(key == "main" for key, _ in max_memory):
        raise OffloadSpecError(
            "with device_map='auto', give max_memory per device (e.g. {0: '6GiB', 1: '6GiB', 'cpu': '30GiB'}), "
            "not a bare size"
        )
    return dict(max_memory)
