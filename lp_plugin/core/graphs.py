"""Decode steps replayed as CUDA graphs (``decode="graph"``): a decode step (one new position per sequence, a
static cache) is captured once per session with ``torch.cuda.CUDAGraph`` and replayed for every later step, so a
launch-bound decode (NF4, small batches) runs at the speed of its kernels. No compiler is involved: the model's
own forward, lp_plugin's hooks and bitsandbytes' kernels run once, under capture.

* What a step reads is copied into the graph's input tensors before each replay: the input embeddings (looked up
  eagerly, so a host lookup (``embeddings="host"``) stays outside the graph), the masks, the position ids.
* The first decode step of each shape in a session runs eagerly (it initialises lazy kernels and workspaces); the
  second is captured and replayed; later ones are replayed. The graphs and their memory go when the session closes.
* Anything else (a prefill, a dynamic cache, gradients, outputs the graph cannot hold) runs eagerly, as it would
  without lp_plugin; :attr:`DecodeGraphs.stats` says how many steps went which way and why.
* A capture that fails (a kernel that synchronises with the host) is counted with its reason, the movers forget
  the loads the capture issued, and the step and the later ones of that shape run eagerly.

docs/graphs.md says more.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field

import torch

_DECODE_REFUSED = ("output_attentions", "output_hidden_states")  # what a replayed step cannot give


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
    eager_steps: int = 0  # decode steps run eagerly: the first of a shape in a session, or after a failed capture
    failed: dict = field(default_factory=dict)  # reason -> captures that failed with it

    def as_dict(self) -> dict:
        return {
            "captured": self.captured,
            "replayed": self.replayed,
            "eager_steps": self.eager_steps,
            "failed": dict(self.failed),
        }


class DecodeGraphs:
    """The captured decode steps of one attached model (one session's worth), and the forward wrapper that
    replays them. ``install`` wraps ``model.forward``; ``remove`` puts it back; ``drop`` (the gate calls it when
    a session closes) frees the graphs."""

    def __init__(self, gate, model, main_device, host_embeddings=None):
        self.gate = gate
        self.model = model
        self.device = torch.device(main_device)
        self.host_embeddings = host_embeddings
        self.stats = GraphStats()
        self._steps: dict = {}  # signature -> _Step, for the open session
        self._seen: set = set()  # signatures whose warm-up step ran eagerly in this session
        self._broken: set = set()  # signatures whose capture failed in this session
        self._lock = threading.RLock()
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
                return original_generate(*args, **self.generate_options(kwargs))

            generate.decode_graphs = self  # type: ignore[attr-defined]
            model.generate = generate
        self.gate.on_close.append(self.drop)
        if self.host_embeddings is not None:
            # the lm_head copy made ahead serves eager decode steps; a replayed step copies it at its start
            self.host_embeddings.copy_ahead = False

    def remove(self) -> None:
        self.drop()
        if self.drop in self.gate.on_close:
            self.gate.on_close.remove(self.drop)
        for name, saved in self._saved.items():
            if saved is not None:
                self.model.__dict__[name] = saved
            else:
                self.model.__dict__.pop(name, None)
        if self.host_embeddings is not None:
            self.host_embeddings.copy_ahead = True

    def generate_options(self, kwargs: dict) -> dict:
        """``generate()``'s keyword arguments with what a replayed decode needs where the caller left it open: a
        static cache (its tensors keep their addresses) and transformers' own compilation off (its compiled
        forward would capture graphs of its own)."""
        kwargs = dict(kwargs)
        config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        chosen = getattr(config, "cache_implementation", None)
        if "past_key_values" not in kwargs and "cache_implementation" not in kwargs and chosen is None:
            if kwargs.get("use_cache", getattr(config, "use_cache", True)) is not False:
                kwargs["cache_implementation"] = "static"
        kwargs.setdefault("disable_compile", True)
        return kwargs

    def drop(self) -> None:
        """Free every captured graph (the session that held their buffers is closing)."""
        with self._lock:
            for step in self._steps.values():
                step.graph.reset()
            self._steps = {}
            self._seen = set()
            self._broken = set()

    # ------------------------------------------------------------------ a call of the model
    def __call__(self, original, args, kwargs):
        if torch.compiler.is_compiling():
            return original(*args, **kwargs)
        call = self._decode_call(args, kwargs)
        if call is None:
            return original(*args, **kwargs)
        signature, leaves, rest = call
        with self._lock, torch.cuda.device(self.device):
            step = self._steps.get(signature)
            if step is None and (signature in self._broken or signature not in self._seen):
                self._seen.add(signature)
                self.stats.eager_steps += 1
                return original(*args, **kwargs)
            if "inputs_embeds" not in rest:
                leaves[("inputs_embeds",)] = self._embed(rest["input_ids"])
            if step is None:
                step = self._capture(original, signature, leaves, rest)
                if step is None:
                    self.stats.eager_steps += 1
                    return original(*args, **kwargs)
            return self._replay(step, leaves)

    def _decode_call(self, args, kwargs):
        """``(signature, leaves, kwargs)`` for a call that is a decode step a graph can replay, else None.
        ``leaves``: ``{path: tensor}`` of the tensors the step reads (the input ids' embeddings are added when
        the step is captured or replayed); ``kwargs``: the call's keyword arguments, the input ids among them."""
        if len(args) > 1 or not self.gate.in_session or torch.is_grad_enabled():
            return None
        if self.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return None
        kwargs = dict(kwargs)
        if args:
            if "input_ids" in kwargs:
                return None
            kwargs["input_ids"] = args[0]
        if kwargs.get("labels") is not None or kwargs.get("return_dict") is False:
            return None
        if any(kwargs.get(name) for name in _DECODE_REFUSED):
            return None
        cache = kwargs.get("past_key_values")
        if cache is None or not getattr(cache, "is_compileable", False) or kwargs.get("use_cache") is False:
            return None
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if (ids is None) == (embeds is None):
            return None
        tokens = ids if ids is not None else embeds
        if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2 or tokens.shape[1] != 1:
            return None  # not one position per sequence: a prefill or a chunk
        if tokens.device != self.device:
            return None
        leaves: dict = {}
        signature: list = [("cache", id(cache)), ("input_ids", None if ids is None else (tuple(ids.shape), ids.dtype))]
        for name in sorted(kwargs):
            value = kwargs[name]
            if name in ("past_key_values", "input_ids"):
                continue
            if name == "attention_mask" and isinstance(value, torch.Tensor) and value.dim() == 2:
                value = kwargs[name] = _pad_mask(value, cache)
            if isinstance(value, dict):
                for key in sorted(value, key=str):
                    if not _leaf(value[key], self.device, leaves, (name, key), signature):
                        return None
            elif not _leaf(value, self.device, leaves, (name,), signature):
                return None
        for path, tensor in leaves.items():
            signature.append((path, tuple(tensor.shape), tensor.dtype))
        return tuple(signature), leaves, kwargs

    def _embed(self, ids):
        return self.model.get_input_embeddings()(ids)

    # ------------------------------------------------------------------ capture and replay
    def _capture(self, original, signature, leaves, kwargs):
        inputs = {path: tensor.clone() for path, tensor in leaves.items()}
        call = {k: v for k, v in kwargs.items() if k != "input_ids"}
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
        except Exception as exc:  # noqa: BLE001 - counted and reported; the step runs eagerly
            text = str(exc).splitlines()[0][:200] if str(exc) else ""
            reason = f"{type(exc).__name__}: {text}"
            self.stats.failed[reason] = self.stats.failed.get(reason, 0) + 1
            self._broken.add(signature)
            for mover in self.gate.movers:
                mover.forget_loads()
            graph.reset()
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


def _leaf(value, device, leaves, path, signature) -> bool:
    """Record one input of a decode step: a tensor on ``device`` among the leaves, a plain value in the signature.
    False for anything a graph cannot take (another device, another kind of object)."""
    if isinstance(value, torch.Tensor):
        if value.device != device:
            return False
        leaves[path] = value
        return True
    if value is None or isinstance(value, (bool, int, float, str)):
        signature.append((path, value))
        return True
    return False


def _pad_mask(mask, cache):
    """A 2D attention mask padded with zeros to the static cache's length (as transformers pads it), so every
    step of a generation has the same shape."""
    try:
        length = int(cache.get_max_cache_shape())
    except (AttributeError, TypeError, ValueError):
        return mask
    if mask.shape[-1] >= length:
        return mask
    return torch.nn.functional.pad(mask, (0, length - mask.shape[-1]))


def _fresh(output):
    """The replayed output with its tensors copied (the next replay rewrites the graph's own)."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return type(output)(_fresh(o) if isinstance(o, torch.Tensor) else o for o in output)
    fields = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in output.items()}
    return type(output)(**fields)
