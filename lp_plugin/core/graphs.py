"""Decode steps replayed as CUDA graphs (``decode="graph"``): a decode step (one new position per sequence, a static
cache of full-attention layers) is captured once with ``torch.cuda.CUDAGraph`` and replayed for every later step, so
a launch-bound decode (NF4, small batches) runs at the speed of its kernels. No compiler is involved: the model's
own forward, lp_plugin's hooks and bitsandbytes' kernels run once, under capture.

* What a step reads is copied into the graph's input tensors before each replay: the input ids (with
  ``embeddings="host"``: their embeddings, looked up eagerly on the host), the masks, the position ids.
* The first decode step of each shape with a cache runs eagerly (it initialises lazy kernels and workspaces); the
  second is captured and replayed; later ones are replayed. The graphs and their memory go when the ``generate()``
  call, or the session, ends, or when the steps move on to another cache.
* Anything else runs eagerly, as it would without lp_plugin; decode steps that cannot be replayed (a dynamic or a
  sliding-window cache, gradients, outputs the graph cannot hold) are counted with the reason in
  :attr:`DecodeGraphs.stats`.
* A capture that fails (a kernel that synchronises with the host) is counted with its reason, the movers forget
  the loads the capture issued, and the steps of that shape run eagerly.

docs/graphs.md says more.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field

import torch

_REFUSED = ("output_attentions", "output_hidden_states")  # outputs a replayed step does not produce
# generate() options whose decoding a static cache does not serve (transformers refuses it, or reorders the cache)
_OWN_CACHE_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "penalty_alpha")


@dataclass
class _Step:
    """One captured decode step: its graph, the tensors it reads (filled before each replay) and its output."""

    graph: torch.cuda.CUDAGraph
    inputs: dict  # leaf path -> the tensor the graph reads
    output: object  # the forward's output at capture: its tensors are rewritten by each replay


@dataclass
class GraphStats:
    """How the decode steps of an attached model ran (``handle.info()["decode"]``)."""

    captured: int = 0  # graphs captured
    replayed: int = 0  # decode steps replayed
    eager_steps: int = 0  # decode steps run eagerly before a replay could: the first of a shape, a failed capture
    failed: dict = field(default_factory=dict)  # reason -> captures that failed with it
    not_graphed: dict = field(default_factory=dict)  # reason -> decode steps no graph could replay

    def as_dict(self) -> dict:
        return {
            "captured": self.captured,
            "replayed": self.replayed,
            "eager_steps": self.eager_steps,
            "failed": dict(self.failed),
            "not_graphed": dict(self.not_graphed),
        }


# ---------------------------------------------------------------------------------- what a step reads
def cache_argument(kwargs: dict) -> str | None:
    """The keyword a forward's KV cache arrives under (transformers renamed ``past_key_values`` to ``cache``)."""
    for name in ("past_key_values", "cache"):
        if kwargs.get(name) is not None:
            return name
    return None


def static_layers(cache) -> list | None:
    """The layers of a cache whose tensors keep their addresses from step to step and whose position a replay
    advances (transformers' ``StaticLayer``: full attention, on the device), else None."""
    layers = getattr(cache, "layers", None)
    if not layers or not getattr(cache, "is_compileable", False) or getattr(cache, "offloading", False):
        return None
    if not all(type(layer).__name__ == "StaticLayer" for layer in layers):
        return None  # a sliding window keeps its position in a Python int, which a replay does not advance
    return list(layers)


def full_attention_only(config) -> bool:
    """Whether a static cache for ``config`` has full-attention layers only (what :func:`static_layers` takes)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        return all(kind == "full_attention" for kind in get_layer_types_and_kwargs(text)[0])
    except Exception:  # noqa: BLE001 - a transformers without it: leave the cache to the caller
        return False


def step_inputs(args: tuple, kwargs: dict, device, embed_ids: bool):
    """What a replay of this forward call would read.

    ``None`` for a call that is not a decode step (a prefill, a chunk); a ``str`` (the reason) for a decode step no
    graph can replay; else ``(signature, leaves, kwargs)``: ``leaves`` maps a path (``("attention_mask",)``,
    ``("attention_mask", "full_attention")``) to each tensor the step reads, ``kwargs`` the call's keyword arguments
    (the input ids among them, a 2D mask padded to the cache's length). With ``embed_ids`` the input ids are not a
    leaf: the caller adds their embeddings as ``("inputs_embeds",)``."""
    kwargs = dict(kwargs)
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            return None
        kwargs["input_ids"] = args[0]
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if (ids is None) == (embeds is None):
        return None
    tokens = ids if ids is not None else embeds
    if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2 or tokens.shape[1] != 1:
        return None  # not one position per sequence
    name = cache_argument(kwargs)
    if name is None:
        return "no cache"
    layers = static_layers(kwargs[name])
    if layers is None:
        return "not a static cache of full-attention layers (pass a StaticCache, or generate() without a cache)"
    if kwargs.get("use_cache") is False:
        return "use_cache=False"
    if kwargs.get("labels") is not None:
        return "labels (a loss)"
    if kwargs.get("return_dict") is False:
        return "return_dict=False"
    for option in _REFUSED:
        if kwargs.get(option):
            return option
    if tokens.device != device:
        return f"inputs on {tokens.device}, not {device}"
    cache = kwargs[name]
    # the cache's tensors, by address: a beam search's reordering replaces them
    tensors = tuple((layer.keys.data_ptr(), layer.values.data_ptr()) for layer in layers if layer.is_initialized)
    signature: list = [("cache", id(cache), tensors)]
    leaves: dict = {}
    if embed_ids and ids is not None and embeds is None:
        signature.append(("input_ids", tuple(ids.shape), ids.dtype))
    length = max(getattr(layer, "max_cache_len", 0) for layer in layers)
    for key in sorted(kwargs):
        value = kwargs[key]
        if key == name or (key == "input_ids" and embed_ids and embeds is None):
            continue
        if key == "attention_mask" and isinstance(value, torch.Tensor) and value.dim() == 2:
            if value.shape[-1] < length:  # transformers pads it with zeros to the cache's length
                value = kwargs[key] = torch.nn.functional.pad(value, (0, length - value.shape[-1]))
        if isinstance(value, dict):
            for sub in sorted(value, key=str):
                why = _leaf(value[sub], device, leaves, (key, sub), signature)
                if why:
                    return why
        else:
            why = _leaf(value, device, leaves, (key,), signature)
            if why:
                return why
    for path, tensor in leaves.items():
        signature.append((path, tuple(tensor.shape), tensor.dtype))
    return tuple(signature), leaves, kwargs


def _leaf(value, device, leaves, path, signature) -> str | None:
    """Record one input of a decode step: a tensor on ``device`` among the leaves, a plain value in the signature.
    The reason a graph cannot take it, else None."""
    if isinstance(value, torch.Tensor):
        if value.device != device:
            return f"{'.'.join(map(str, path))} on {value.device}, not {device}"
        leaves[path] = value
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        signature.append((path, value))
        return None
    return f"{'.'.join(map(str, path))} is a {type(value).__name__}"


# ---------------------------------------------------------------------------------- the model's decode graphs
class DecodeGraphs:
    """The captured decode steps of one attached model, and the wrappers that replay them: ``install`` wraps
    ``model.forward`` and ``model.generate``; ``remove`` puts them back; ``drop`` frees the graphs (at the end of
    each ``generate()`` call, and as a session closes: the gate calls it)."""

    def __init__(self, gate, model, main_device, host_embeddings=None):
        self.gate = gate
        self.model = model
        self.device = torch.device(main_device)
        self.host_embeddings = host_embeddings
        self.stats = GraphStats()
        # one lock with the gate's: replays and captures run one at a time with the forwards that share buffers
        self.lock = gate.lock
        self._steps: dict = {}  # signature -> _Step, for one cache
        self._seen: set = set()  # signatures whose first step ran eagerly
        self._broken: set = set()  # signatures whose capture failed
        self._cache: int | None = None  # id() of the cache the steps are for
        self._saved: dict = {}  # the model's own forward and generate attributes, if it had any

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        model = self.model
        self._saved = {name: model.__dict__.get(name) for name in ("forward", "generate")}
        original_forward, original_generate = model.forward, getattr(model, "generate", None)

        @functools.wraps(original_forward)
        def forward(*args, **kwargs):
            return self(original_forward, args, kwargs)

        forward.decode_graphs = self  # type: ignore[attr-defined]  # marks the wrapper (wraps copies the name)
        model.forward = forward
        if original_generate is not None:

            @functools.wraps(original_generate)
            def generate(*args, **kwargs):
                args, kwargs = self.generate_options(args, kwargs)
                try:
                    return original_generate(*args, **kwargs)
                finally:
                    self.drop()  # (the next call makes a cache of its own)

            generate.decode_graphs = self  # type: ignore[attr-defined]
            model.generate = generate
        self.gate.on_close.append(self.drop)

    def remove(self) -> None:
        self.drop()
        if self.drop in self.gate.on_close:
            self.gate.on_close.remove(self.drop)
        for name, saved in self._saved.items():
            if saved is not None:
                self.model.__dict__[name] = saved
            else:
                self.model.__dict__.pop(name, None)

    def generate_options(self, args: tuple, kwargs: dict) -> tuple:
        """``generate()``'s arguments with what a replayed decode needs where the caller left it open: a static cache
        (its tensors keep their addresses; not for a model with sliding-window layers, beam search, assisted or
        contrastive decoding) and transformers' own compilation off (its compiled forward would capture graphs of
        its own). A generation config passed in is copied and changed, never the caller's object."""
        kwargs = dict(kwargs)
        args = tuple(args)
        given = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
        config = given if given is not None else getattr(self.model, "generation_config", None)

        def chosen(name, default=None):
            return kwargs[name] if name in kwargs else getattr(config, name, default)

        changes: dict = {}
        open_cache = cache_argument(kwargs) is None and chosen("cache_implementation") is None
        plain_search = (chosen("num_beams", 1) or 1) <= 1 and not any(chosen(o) for o in _OWN_CACHE_OPTIONS)
        if open_cache and plain_search and chosen("use_cache", True) is not False:
            if full_attention_only(self.model.config):
                changes["cache_implementation"] = "static"
        if "disable_compile" not in kwargs and chosen("compile_config") is None and not chosen("disable_compile"):
            changes["disable_compile"] = True
        if not changes:
            return args, kwargs
        if given is None:
            return args, {**kwargs, **changes}
        given = copy.deepcopy(given)
        for name, value in changes.items():
            if name not in kwargs:
                setattr(given, name, value)
        if "generation_config" in kwargs:
            kwargs["generation_config"] = given
        else:
            args = (args[0], given, *args[2:])
        return args, kwargs

    def drop(self) -> None:
        """Free every captured graph."""
        with self.lock:
            for step in self._steps.values():
                step.graph.reset()
            self._steps = {}
            self._seen = set()
            self._broken = set()
            self._cache = None

    # ------------------------------------------------------------------ a call of the model
    def __call__(self, original, args, kwargs):
        if torch.compiler.is_compiling() or self.device.type != "cuda":
            return original(*args, **kwargs)
        found = step_inputs(args, kwargs, self.device, embed_ids=self.host_embeddings is not None)
        if found is None:
            return original(*args, **kwargs)
        if isinstance(found, str):
            return self._eager(original, args, kwargs, found)
        if not self.gate.in_session:
            return self._eager(original, args, kwargs, "outside a session (generate() opens one)")
        if torch.is_grad_enabled():
            return self._eager(original, args, kwargs, "gradients enabled")
        if torch.cuda.is_current_stream_capturing():
            return original(*args, **kwargs)
        signature, leaves, rest = found
        with self.lock, torch.cuda.device(self.device):
            if signature[0][1] != self._cache:
                self.drop()  # the steps moved on to another cache: the old one's graphs would keep it alive
                self._cache = signature[0][1]
            step = self._steps.get(signature)
            if step is None and (signature in self._broken or signature not in self._seen):
                self._seen.add(signature)
                self.stats.eager_steps += 1
                return original(*args, **kwargs)
            if not all(mover.ready_for_replay() for mover in self.gate.movers):
                return self._eager(original, args, kwargs, "a forward was cut short: its buffers are out of step")
            if self.host_embeddings is not None and "inputs_embeds" not in rest:
                leaves[("inputs_embeds",)] = self._embed(rest["input_ids"])
            if step is None:
                step = self._capture(original, signature, leaves, rest)
                if step is None:
                    self.stats.eager_steps += 1
                    return original(*args, **kwargs)
            return self._replay(step, leaves)

    def _eager(self, original, args, kwargs, reason: str):
        self.stats.not_graphed[reason] = self.stats.not_graphed.get(reason, 0) + 1
        return original(*args, **kwargs)

    def _embed(self, ids):
        """The input embeddings looked up in host memory (no lm_head copy made ahead: the replayed step copies it)."""
        host = self.host_embeddings
        ahead, host.copy_ahead = host.copy_ahead, False
        try:
            return self.model.get_input_embeddings()(ids)
        finally:
            host.copy_ahead = ahead

    # ------------------------------------------------------------------ capture and replay
    def _capture(self, original, signature, leaves, kwargs):
        inputs = {path: tensor.clone() for path, tensor in leaves.items()}
        call = dict(kwargs)
        if ("inputs_embeds",) in inputs and "input_ids" in call:
            call.pop("input_ids")
        for path, tensor in inputs.items():
            if len(path) == 1:
                call[path[0]] = tensor
            else:
                call[path[0]] = dict(call[path[0]])
                call[path[0]][path[1]] = tensor
        graph = torch.cuda.CUDAGraph()
        head = self.host_embeddings.resident() if self.host_embeddings is not None else contextlib.nullcontext()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                with head:  # a host lm_head is copied as the step starts
                    output = original(**call)
        except BaseException as exc:
            text = str(exc).splitlines()[0][:200] if str(exc) else ""
            reason = f"{type(exc).__name__}: {text}"
            self.stats.failed[reason] = self.stats.failed.get(reason, 0) + 1
            self._broken.add(signature)
            for mover in self.gate.movers:
                mover.forget_loads()
            graph.reset()
            if not isinstance(exc, Exception):
                raise
            return None
        step = self._steps[signature] = _Step(graph, inputs, output)
        self.stats.captured += 1
        return step

    def _replay(self, step: _Step, leaves: dict):
        for path, tensor in leaves.items():
            step.inputs[path].copy_(tensor)
        for mover in self.gate.movers:
            mover.check_unedited()
        step.graph.replay()
        self.stats.replayed += 1
        return _fresh(step.output)


def _fresh(output):
    """The replayed output with its tensors copied (the next replay rewrites the graph's own)."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return type(output)(_fresh(o) if isinstance(o, torch.Tensor) else o for o in output)
    fields = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in output.items()}
    return type(output)(**fields)
