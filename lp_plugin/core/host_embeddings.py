"""The input embeddings and the lm_head in host memory (``embeddings="host"``): the input embeddings and the output
embedding (lm_head) keep their tensors in pinned host memory instead of on the main device.

* The input embeddings are looked up on the host: the token ids are moved there, the module's own
  forward runs there (a gather is exact; an architecture that scales inside its embedding module keeps
  its own semantics) and its output goes to the main device.
* The lm_head's tensors are copied whole into device tensors for each call and freed after (the
  caching allocator reuses the block), so its product is the plain model's own, bit for bit.
  :meth:`HostEmbeddings.resident` keeps that copy across several calls (one scoring pass's head chunks).
* In a decode step (one position per sequence) on CUDA, that copy starts as the step's input embeddings are
  looked up, so it moves while the decoder layers run instead of after them: carried in pieces by stream
  mode's ring (``carrier``) behind its layers' copies, or on a side stream of its own. Its memory is the
  head's own, held while the step's layers run; what a decode step adds there (one position's activations,
  and a layer's cache held twice for a moment as it grows) is no more than the planner's lm_head phase holds
  besides the copy (the final hidden states of the whole window, the logits), so the plan's peak holds.
  A copy made ahead is used only by an eager call with the lm_head's tensors unchanged since it started.
  docs/card.md says more.
* A tied lm_head shares the embeddings' host tensor: host memory holds one copy.

The tensors keep their objects (``.data`` points them at the host copies, as the units' bindings do),
so a tied pair stays tied; :meth:`HostEmbeddings.restore` (detach) points them at device tensors again, or
gives a module Accelerate had offloaded back to its hooks.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn as nn

from ..errors import OffloadSpecError
from . import accel
from .flat import aligned_like, residue
from .tiers import allocate_host

ATTR = "_lp_host_embeddings"  # on the lm_head module: the HostEmbeddings that owns it (read by resident())


def embedding_modules(model) -> tuple:
    """``(input embedding module, lm_head module)`` of ``model``; :class:`OffloadSpecError` for a model
    whose embeddings cannot be kept in host memory (called before anything is read or changed)."""
    name = type(model).__name__
    fix = "attach with embeddings='device' (the default)"
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(embed, nn.Module) or not isinstance(getattr(embed, "weight", None), torch.Tensor):
        raise OffloadSpecError(f"embeddings='host': {name} has no input embedding module with a weight; {fix}")
    if not isinstance(head, nn.Module):
        raise OffloadSpecError(f"embeddings='host': {name} has no output embedding (lm_head); {fix}")
    if type(head) is not nn.Linear:
        raise OffloadSpecError(
            f"embeddings='host': {name}'s lm_head is a {type(head).__name__}, not a plain torch.nn.Linear (whose "
            f"product lp_plugin can run on a copy of its weight); {fix}"
        )
    return embed, head


def _tensors(module) -> list:
    """``[(owner module, "_parameters" or "_buffers", name)]`` of every tensor in ``module``."""
    return [
        (sub, kind, name)
        for sub in module.modules()
        for kind in ("_parameters", "_buffers")
        for name, t in getattr(sub, kind).items()
        if t is not None
    ]


_REPORTING: dict = {}  # (model class, device) -> its subclass whose ``device`` is that device


def report_device(model, device):
    """Make ``model.device`` say ``device``, the main device; returns the undo. transformers' ``device`` is the
    first parameter's device, the input embeddings' (in host memory here), and ``generate()`` moves each step's
    inputs there, which would leave the position ids on the host. The model's class is swapped for a subclass
    of the same name with that property only (no other attribute changes); a class without a ``device``
    property is left alone."""
    cls = type(model)
    if not isinstance(getattr(cls, "device", None), property):
        return lambda: None
    key = (cls, torch.device(device))
    sub = _REPORTING.get(key)
    if sub is None:
        fixed = torch.device(device)
        sub = _REPORTING[key] = type(
            cls.__name__,
            (cls,),
            {"device": property(lambda self: fixed), "__module__": cls.__module__, "__qualname__": cls.__qualname__},
        )
    model.__class__ = sub

    def undo() -> None:
        if type(model) is sub:
            model.__class__ = cls

    return undo


def resident(module):
    """Keep the host lm_head ``module``'s device copy across the calls in the block (one copy for all);
    a no-op for any other module."""
    owner = module.__dict__.get(ATTR)
    return contextlib.nullcontext() if owner is None else owner.resident()


def _capturing(device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph (False off CUDA)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


class _Entry:
    """One tensor of the two modules (a tied one once): where it sits, its host copy, the object the model
    holds now. A tensor on the device keeps its object (``.data`` moves); a meta placeholder behind an
    Accelerate hook is replaced by a tensor over the host copy, and put back by :meth:`HostEmbeddings.restore`."""

    def __init__(self, tensor, owner, host):
        self.original = tensor
        self.owners = [owner]  # [(module, "_parameters" or "_buffers", name)]
        self.device = tensor.device
        self.host = host
        self.current = tensor

    def point_at(self, value) -> None:
        if self.device.type != "meta":
            self.current.data = value
            return
        if self.current is self.original:  # a meta placeholder: a new tensor in its place (as Accelerate makes)
            new = value
            if isinstance(self.original, nn.Parameter):
                new = nn.Parameter(value, requires_grad=self.original.requires_grad)
            self._assign(new)
        else:
            self.current.data = value

    def restore(self) -> None:
        if self.device.type == "meta":
            self._assign(self.original)
        else:
            self.original.data = aligned_like(self.host, self.device).copy_(self.host)

    def _assign(self, tensor) -> None:
        for module, kind, name in self.owners:
            getattr(module, kind)[name] = tensor
        self.current = tensor


class HostEmbeddings:
    """The owner of the input embeddings and the lm_head kept in host memory: their host copies, the
    hooks that run them, and how detach gives them back."""

    def __init__(self, embed, head, main_device, pin: bool):
        self.embed, self.head = embed, head
        self.main_device = main_device
        self.pin = pin
        self.entries: list[_Entry] = []  # the modules' tensors, tied ones once
        self.head_entries: list[_Entry] = []  # the lm_head's (a tied weight among them)
        self.tied = any(p is q for p in embed.parameters() for q in head.parameters())
        self.accel_hooks = {m: accel.offload_hooks(m) for m in (embed, head)}
        self.suspended: list = []
        self.held: list = []  # [(dict, full key, host copy)]: Accelerate's host copies, freed while attached
        self.head_copies = 0  # device copies of the lm_head made (one per call, or per resident block)
        self.head_copies_ahead = 0  # of those, copies started at a decode step's input embeddings
        self._side: torch.cuda.Stream | None = None  # the stream of the copies made ahead (made at the first)
        # the copy made ahead: (device tensors in head_entries' order, the copy's end event, the carrier or None,
        # the stream that allocated the tensors, the head tensors' versions when it started)
        self._ahead: tuple | None = None
        self.carrier = None  # the main device's stream-mode Ring, which carries the copy made ahead (set by attach)
        self.copy_ahead = True  # False: a decode step copies the lm_head at its call, like any other forward
        self._depth = 0
        self._bound: list = []
        self._lock = threading.RLock()
        self._torch_hooks: list = []

    # ------------------------------------------------------------------ attach
    def pack(self) -> None:
        """Copy the two modules' tensors into host memory (pinned when there is a GPU). Reads the model only."""
        seen: dict = {}
        for module in (self.embed, self.head):
            values, held = ({}, [])
            if self.accel_hooks[module]:
                values, held = accel.hooked_values(module, self.accel_hooks[module])
            owners = {id(sub): qual for qual, sub in module.named_modules()}
            for sub, kind, name in _tensors(module):
                tensor = getattr(sub, kind)[name]
                key = f"{owners[id(sub)]}.{name}" if owners[id(sub)] else name
                value = values.get(key, tensor)
                if value.device.type == "meta":
                    raise OffloadSpecError(
                        f"embeddings='host': {type(module).__name__}.{key} is on the meta device with no Accelerate "
                        "hook holding its value; load the model's weights before attaching"
                    )
                entry = seen.get(id(tensor))
                if entry is not None:  # tied: one host copy
                    entry.owners.append((sub, kind, name))
                else:
                    # on a CPU main device the copy keeps the tensor's alignment (``lp_plugin.core.flat``)
                    shift = residue(value) if self.main_device.type == "cpu" else 0
                    nbytes = value.numel() * value.element_size()
                    host = allocate_host(nbytes + shift, self.pin, f"the model's {key}")[shift : shift + nbytes]
                    host = host.view(value.dtype).view(value.shape)
                    host.copy_(value)
                    entry = seen[id(tensor)] = _Entry(tensor, (sub, kind, name), host)
                    self.entries.append(entry)
                if module is self.head:
                    self.head_entries.append(entry)
            self.held += [(store, full_key) for store, full_key, _ in held]

    @property
    def host_bytes(self) -> int:
        return sum(e.host.numel() * e.host.element_size() for e in self.entries)

    @property
    def head_bytes(self) -> int:
        """Bytes of the lm_head's tensors: what each call copies to the device."""
        return sum(e.host.numel() * e.host.element_size() for e in self.head_entries)

    def dtypes(self) -> set:
        return {e.host.dtype for e in self.entries}

    def install(self) -> None:
        """Point the tensors at their host copies and hook the two modules (the model changes from here)."""
        for hooks in self.accel_hooks.values():
            if hooks:  # Accelerate offloaded the module: its hooks would move it to the device on every call
                self.suspended += [accel.SuspendedHook(sub) for _, sub, _ in hooks]
        self.held = [(store, key, store.pop(key, None)) for store, key in self.held]
        for entry in self.entries:
            entry.point_at(entry.host)
        self.head.__dict__[ATTR] = self
        self._torch_hooks = [
            self.embed.register_forward_pre_hook(self._embed_in, with_kwargs=True),
            self.embed.register_forward_hook(self._embed_out),
            self.head.register_forward_pre_hook(lambda module, args: self._enter()),
            self.head.register_forward_hook(lambda module, args, output: self._exit(), always_call=True),
        ]

    def restore(self) -> None:
        """Undo :meth:`install`: the tensors on their device again (a tied pair still one tensor), or meta
        behind Accelerate's hooks, as they were before attach."""
        self._drop_ahead()
        for h in self._torch_hooks:
            h.remove()
        self._torch_hooks = []
        self.head.__dict__.pop(ATTR, None)
        for entry in self.entries:
            entry.restore()
        for store, key, value in self.held:
            if value is not None:
                store[key] = value
        self.held = []
        for s in self.suspended:
            s.restore()
        self.suspended = []

    # ------------------------------------------------------------------ running
    def _embed_in(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input")
        self._copy_ahead(isinstance(ids, torch.Tensor) and ids.dim() > 0 and ids.shape[-1] == 1)
        cpu = torch.device("cpu")
        move = lambda v: v.to(cpu) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    def _embed_out(self, module, args, output):
        if isinstance(output, torch.Tensor):
            return output.to(self.main_device)
        return type(output)(o.to(self.main_device) if isinstance(o, torch.Tensor) else o for o in output)

    # the head's copy in and out runs eagerly: a compiled forward calls these, never traces them (they move
    # memory and count nested calls, and a traced counter would become a guard)
    @torch.compiler.disable
    def _copy_ahead(self, decode: bool) -> None:
        """At a forward's input embeddings: drop a copy made ahead that no call took (a forward cut short, or one
        without the lm_head), and for a decode step start this forward's (on CUDA, from pinned host memory, with
        no copy kept by :meth:`resident`). The tensors are allocated on the compute stream, whose queue is past
        any earlier user of their memory when the copy starts."""
        if self.main_device.type != "cuda" or _capturing(self.main_device):
            return  # (a copy made ahead outside a capture is dropped by the next eager forward)
        with self._lock:
            self._drop_ahead()
            pinned = all(e.host.is_pinned() for e in self.head_entries)
            if not (decode and self.copy_ahead and pinned) or self._depth:
                return
            stream = torch.cuda.current_stream(self.main_device)
            tensors = [torch.empty_like(e.host, device=self.main_device) for e in self.head_entries]
            done = torch.cuda.Event()
            carrier = self.carrier
            if carrier is None or not carrier.carry([(t, e.host) for t, e in zip(tensors, self.head_entries)], done):
                carrier = None
                side = self._side = self._side or torch.cuda.Stream(self.main_device)
                side.wait_stream(stream)
                with torch.cuda.stream(side):
                    for dev, entry in zip(tensors, self.head_entries):
                        dev.copy_(entry.host, non_blocking=True)
                    done.record()
            self._ahead = (tensors, done, carrier, stream, self._versions())

    def _versions(self) -> list:
        return [e.current._version for e in self.head_entries]

    def _await_ahead(self) -> list:
        """The current stream waits for the copy made ahead (whatever pieces a carrier still holds are issued
        first), and so does the stream that allocated its tensors, where their memory goes back when freed (another
        thread's stream may take them: they are then recorded as used there too); returns its device tensors."""
        assert self._ahead is not None
        tensors, done, carrier, stream, _ = self._ahead
        self._ahead = None
        if carrier is not None:
            carrier.flush()
        stream.wait_event(done)
        current = torch.cuda.current_stream(self.main_device)
        if current != stream:
            current.wait_event(done)
            for t in tensors:
                t.record_stream(current)
        return tensors

    def _drop_ahead(self) -> None:
        """Free a copy made ahead that no call took: the compute stream, where its memory may be reused next,
        waits for the copy first."""
        if self._ahead is not None:
            self._await_ahead()

    @torch.compiler.disable
    def _enter(self) -> None:
        with self._lock:
            self._depth += 1
            if self._depth > 1:
                return
            try:
                ahead = self._ahead
                if ahead is not None and _capturing(self.main_device):
                    ahead = None  # inside a capture: copy now (an eager forward drops the copy made ahead)
                elif ahead is not None and ahead[4] != self._versions():
                    ahead = None  # the lm_head was edited since the copy started: copy now
                    self._drop_ahead()
                if ahead is not None:
                    tensors = self._await_ahead()
                    self.head_copies_ahead += 1
                else:
                    tensors = []
                    for entry in self.head_entries:
                        dev = aligned_like(entry.host, self.main_device)
                        dev.copy_(entry.host, non_blocking=entry.host.is_pinned())
                        tensors.append(dev)
                for dev, entry in zip(tensors, self.head_entries):
                    entry.point_at(dev)
                    self._bound.append(entry)
                self.head_copies += 1
            except BaseException:
                self._exit()
                raise

    @torch.compiler.disable
    def _exit(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth:
                return
            for entry in self._bound:
                entry.point_at(entry.host)
            self._bound = []

    @contextlib.contextmanager
    def resident(self):
        """The lm_head's device copy stays for the block: the head's calls inside make no copy of their own."""
        self._enter()
        try:
            yield
        finally:
            self._exit()
