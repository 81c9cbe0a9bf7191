"""``attach``, ``OffloadHandle`` and ``session``: putting an :class:`OffloadPlan` onto a model.

``attach(model, ...)`` resolves the options into a plan, packs every offloaded layer (and every skipped
layer's stand-in) into its tier (reading the model only: a failure leaves the model as it was), then
installs: the layers' tensors point at the tier's host copy, Accelerate's offload of those layers and its
leftover dispatch hooks are suspended, hooks go on the layers (``hooks.py``) and on the model (``entry.py``).

* ``session`` mode: between sessions only the resident layers occupy the main device. A session
  (``with lp_plugin.session(model)``, each ``generate()`` call, each bare forward) copies every
  offloaded layer into a device buffer; leaving it points the layers back at their host copy.
* ``stream`` mode: each forward pulls the offloaded layers through a ring of device buffers
  (``stream.py``); a session keeps the ring and its prefetch alive across forwards.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys

import torch
from tqdm.auto import tqdm

from ..core import accel, hooks, pinning
from ..core.devices import check_usable, map_value, normalize_device
from ..core.entry import ModelEntry
from ..core.gate import SessionGate, copy_error, refuse_copy
from ..core.graphs import DecodeGraphs
from ..core.group import OffloadedLayer, Stager, StandIn, execution_order, offloaded_dtypes
from ..core.host_embeddings import HostEmbeddings, embedding_modules, report_device
from ..core.mlp_chunks import MlpChunks, dense_mlp
from ..core.mover import Mover
from ..core.record import InstallRecord
from ..core.resident import Residency
from ..core.stream import Ring
from ..errors import AttachError, OffloadResourceError, OffloadSpecError
from ..planning.arch import find_decoder_layers
from ..planning.budget import host_budget
from ..planning.config import OffloadConfig
from ..planning.plan import OffloadPlan
from ..planning.plugins import tier_class
from .checks import check_absent, check_graph_decode, check_model, check_options
from .reporter import HandleReport

log = logging.getLogger("lp_plugin")

_ATTR = "_lp_offload"
_GiB = 1024**3
_DEVICE_MARGIN = 256 * 1024**2  # room left on the device beyond what we allocate (activations, allocator slack)


def get_handle(model):
    """The :class:`OffloadHandle` attached to ``model``, or ``None``."""
    return model.__dict__.get(_ATTR)


def session(model):
    """Context manager keeping the offloaded layers of ``model`` resident (session mode) or its ring
    allocated (stream mode). Re-entrant and thread-safe; a no-op for a model with nothing attached."""
    handle = get_handle(model)
    return contextlib.nullcontext() if handle is None else handle.session()


class OffloadHandle:
    """What ``attach`` returns. ``detach()`` restores the plain model; ``info()`` describes the layout.

    It composes three parts: the session gate (``gate``: sessions, what the hooks see), the install
    record (``record``: every change made to the model and its undo, replayed by ``detach``) and the
    reporter (``report``: ``info()``, ``print(handle)``)."""

    def __init__(
        self, model, plan: OffloadPlan, layers, stand_ins, dropped, tier, host_embeddings: HostEmbeddings | None = None
    ):
        self.model = model
        self.plan = plan
        self.config = plan.config
        self.layers = layers  # [OffloadedLayer]: the model's offloaded layers, execution order
        self.stand_ins = stand_ins  # {index: StandIn}: the skipped layers' stand-ins, by index
        self.dropped = dropped  # [(index, module)]
        self.tier = tier
        self.host_embeddings = (
            host_embeddings  # the input embeddings and lm_head in host memory (embeddings="host"), else None
        )
        self.main_device = plan.main_device
        self.stats = {"sessions": 0, "session_load_s": 0.0, "forwards": 0}
        # movers: per device the units compute on, a Ring (stream mode) or a Residency (session mode)
        self.gate = SessionGate([], self.stats)
        self.record = InstallRecord()
        self.report = HandleReport(model, plan, layers, stand_ins, dropped, tier, self.gate, host_embeddings)
        self.entry: ModelEntry | None = None
        self.graphs: DecodeGraphs | None = None  # decode="graph": the captured decode steps
        self.mlp_chunks: MlpChunks | None = None  # the plan's mlp_chunk: prefill MLPs run in chunks of positions

    # ------------------------------------------------------------------ description
    mode = property(lambda self: self.config.mode)
    alpha = property(lambda self: self.config.alpha)
    tier_name = property(lambda self: self.config.tier)

    @property
    def layer_indices(self) -> list[int]:
        return self.report.layer_indices

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of the offloaded layers (not the stand-ins) held by the tier."""
        return self.report.offloaded_bytes

    def info(self) -> dict:
        return self.report.info()

    def summary(self) -> str:
        """What ``print(handle)`` shows: what was offloaded, where it lives, what stays and moves."""
        return self.report.summary()

    __str__ = summary

    def __repr__(self):
        return self.report.repr()

    def log_attached(self) -> None:
        """The one line ``attach`` (and so ``from_pretrained``) logs at INFO on logger ``lp_plugin``."""
        self.report.log_attached()

    def __deepcopy__(self, memo):
        raise copy_error()

    @property
    def movers(self) -> list:
        """Per device the offloaded layers compute on: its mover (``lp_plugin.core.mover``)."""
        return self.gate.movers

    @property
    def rings(self) -> list:
        return [m for m in self.movers if isinstance(m, Ring)]

    @property
    def ring(self):
        """The ring of a model whose offloaded layers compute on one device (stream mode), else None."""
        rings = self.rings
        return rings[0] if len(rings) == 1 else None

    @property
    def mapped_bytes(self) -> int:
        """Device memory held outside PyTorch's allocator (not in ``torch.cuda.memory_allocated``): the
        session buffers or rings while a session is open."""
        return self.gate.mapped_bytes

    @property
    def peak_mapped_bytes(self) -> int:
        """The most device memory the session buffers or rings held at once."""
        return self.gate.peak_mapped_bytes

    @property
    def units(self) -> list:
        """What the movers move: the offloaded layers and the stand-ins, in execution order."""
        return execution_order(self.layers, self.stand_ins)

    def offloaded_dtypes(self) -> set:
        return offloaded_dtypes(self.units)

    # ------------------------------------------------------------------ sessions
    @contextlib.contextmanager
    def session(self):
        """Offloaded layers resident (session mode) or the ring allocated (stream mode) for the block;
        re-entrant and thread-safe. Leaving the outermost block, also by an exception, returns to
        standby: the device memory is freed."""
        pinning.give_back_collected()  # what a model dropped without detach had lent
        with self.gate.session():
            yield self

    @property
    def in_session(self) -> bool:
        """A session is open (session mode: the offloaded layers are on the device)."""
        return self.gate.in_session

    def check_device_room(self, nbytes, device, what, fix):
        free = _free_bytes(device)
        if free is None:
            return
        margin = 0 if self.plan.budget is not None else _DEVICE_MARGIN  # a budget plan counted the whole peak
        if nbytes + margin > free and device.type == "cuda":
            torch.cuda.empty_cache()  # blocks the caching allocator holds but nothing uses
            free = _free_bytes(device)
        if nbytes + margin > free:
            raise OffloadResourceError(
                f"{what} needs {nbytes / _GiB:.2f} GiB on {device} but only {free / _GiB:.2f} GiB is free; {fix}"
            )

    # ------------------------------------------------------------------ detach
    def detach(self, remove_files: bool = False):
        """Restore the plain model: offloaded weights back where they were as independent tensors (with
        any edit made while attached), Accelerate's hooks and device map as they were, our hooks
        removed, tier files closed. ``remove_files=True`` also deletes the disk tier's layer files
        (only those lp_plugin provably wrote; a temporary folder goes in any case)."""
        if not self.gate.attached:
            raise AttachError("detach() called twice: this model is no longer attached")
        self.gate.close_interrupted()
        with self.gate.lock:
            if self.gate.depth:
                raise AttachError(
                    "cannot detach inside an open session; leave the `with lp_plugin.session(model)` block first"
                )
            for unit in self.units:  # every copy on the tier is still the verified one, before anything changes
                unit.tier.check(unit.key)
                unit.note_standby_edit()
            self.record.undo()
            if remove_files:
                removed = self.tier.remove_files()
                if removed:
                    log.info("lp_plugin: removed %d offload file(s) from %s", len(removed), self.tier.offload_folder)
            self.tier.close()
            self.gate.attached = False


def _free_bytes(device):
    """Free memory on ``device`` (None where it is not a GPU)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------- attach
def attach(model, config: OffloadConfig | None = None, *, plan: OffloadPlan | None = None, **options) -> OffloadHandle:
    """Offload the layers chosen by ``offload`` of an already loaded (or Accelerate-dispatched) model.
    Options are those of :class:`OffloadConfig` (``offload``, ``tier``, ``mode``, ``alpha``,
    ``offload_folder``, ``prefetch``, ...), or ``plan`` (an :class:`OffloadPlan` made for a model of this
    shape, which carries its own options: not with ``config`` or options). Returns an :class:`OffloadHandle`;
    ``handle.detach()`` restores the plain model.

    Nothing is changed on the model until every offloaded layer is safely stored on its tier: a failure
    (bad option, full disk, too little pinned memory) leaves the model as it was.
    """
    if not isinstance(model, torch.nn.Module):
        raise AttachError(
            f"attach takes a loaded model (a torch.nn.Module such as a transformers model), got "
            f"{type(model).__name__}; to load one from a folder or a Hub id, use lp_plugin.from_pretrained(...)"
        )
    if get_handle(model) is not None:
        raise AttachError(
            "this model is already attached; call lp_plugin.get_handle(model).detach() before attaching again"
        )
    pinning.give_back_collected()  # what a model dropped without detach had lent
    _, layer_list = find_decoder_layers(model)
    checkpoint = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not (isinstance(checkpoint, str) and os.path.isabs(os.path.expanduser(checkpoint))):
        checkpoint = None  # (a relative one was relative to where the model was loaded from, perhaps not here)
    if plan is None:
        config = OffloadConfig.from_options(config, **options)
        check_options(config, checkpoint)
        check_absent(layer_list, config)
        plan = OffloadPlan.for_model(model, config)
        check_usable(plan.main_device)
    else:
        if config is not None or options:
            raise OffloadSpecError(
                "attach(plan=...) runs the plan with the options it was made with; pass a plan or options "
                "(config=, offload=, ...), not both"
            )
        if plan.num_layers != len(layer_list):
            raise AttachError(
                f"this plan was made for a model of {plan.num_layers} decoder layers, and this model has "
                f"{len(layer_list)}; make the plan from this model's config (OffloadPlan.for_config) or pass options"
            )
        check_options(plan.config, checkpoint)
        check_usable(plan.main_device)
        check_absent(layer_list, plan.config, plan.skips)
    plan = plan.with_skips(model)
    config = plan.config
    check_model(model, plan, layer_list)
    check_graph_decode(plan, config)
    embedding_pair = embedding_modules(model) if config.embeddings == "host" else None

    pin = any(plan.device_of(i).type == "cuda" for i in range(plan.num_layers)) or plan.main_device.type == "cuda"
    tag = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    tier = tier_class(config.tier)(pin=pin, offload_folder=config.offload_folder, model_tag=tag)
    # (a planned config no longer carries max_memory: the plan keeps its host budget)
    tier.host_budget = (
        plan.budget.host_budget_bytes if plan.budget is not None else host_budget(config.max_memory, plan.main_device)
    )
    # what moves between tier and device, packed in execution order: the offloaded layers of the model and
    # the skipped layers' stand-ins
    todo = sorted(
        [(i, OffloadedLayer, layer_list[i]) for i in plan.offloaded]
        + [(i, StandIn, module) for i, module in plan.skips.stand_ins.items()],
        key=lambda item: item[0],
    )
    packed = {}
    host_embeddings = None if embedding_pair is None else HostEmbeddings(*embedding_pair, plan.main_device, pin)
    try:
        if host_embeddings is not None:
            host_embeddings.pack()
        # no tqdm object unless it draws: tqdm takes a lock shared with its monitor thread even when disabled, and a
        # process forked while that thread held it would block here
        bar = (
            tqdm(todo, desc=f"lp_plugin: packing layers ({config.tier} tier)", unit="layer", leave=False)
            if sys.stderr.isatty()
            else todo
        )
        for i, kind, module in bar:
            packed[i] = kind.pack(i, module, tier, plan.device_of(i), pin)
    except BaseException:
        tier.close()
        raise
    layers = [packed[i] for i in sorted(plan.offloaded)]
    stand_ins = {i: packed[i] for i in sorted(plan.skips.stand_ins)}

    # --- from here on the model is changed
    handle = OffloadHandle(
        model, plan, layers, stand_ins, [(i, layer_list[i]) for i in plan.dropped], tier, host_embeddings
    )
    try:
        _install(handle, model, layer_list)
    except BaseException:
        handle.detach()
        raise
    handle.log_attached()
    return handle


def _install(handle, model, layer_list):
    """Change the model, recording each change with its undo in ``handle.record``."""
    plan, config, record, gate = handle.plan, handle.config, handle.record, handle.gate
    model.__dict__[_ATTR] = handle
    record.did("the handle on the model", lambda: model.__dict__.pop(_ATTR, None))
    model.__dict__["__reduce_ex__"] = refuse_copy  # before pickle meets a hook it cannot name
    record.did("copies refused", lambda: model.__dict__.pop("__reduce_ex__", None))
    if handle.host_embeddings is not None:
        host_embeddings = handle.host_embeddings
        record.did("the input embeddings and lm_head in host memory", host_embeddings.restore)
        host_embeddings.install()
        record.did("model.device reports the main device", report_device(model, plan.main_device))
    installed: list = []  # layers whose tensors point at the tier (the last one perhaps in part)
    record.did("the layers' tensors on the tier", lambda: _restore(installed))
    for layer in handle.layers:
        if layer.accel_hooks:
            log.debug("lp_plugin: taking over Accelerate's offload of layer %d (restored by detach())", layer.index)
        installed.append(layer)
        layer.install()
    for stand_in in handle.stand_ins.values():  # not part of the model: nothing to give back at detach
        stand_in.install()
    if plan.single_device:  # with several devices, Accelerate's hooks move activations between them
        for suspended in accel.suspend_dispatch_hooks(model, plan.main_device):
            record.did("an Accelerate dispatch hook suspended", suspended.restore)
        for suspended in accel.suspend_move_wrappers(model):
            record.did("Accelerate's move wrappers suspended", suspended.restore)
    if hasattr(model, "hf_device_map"):
        device_map = model.hf_device_map
        record.did("hf_device_map: where the layers compute", lambda: setattr(model, "hf_device_map", device_map))
        model.hf_device_map = _computing_map(device_map, plan)
    hooked: set = set()
    for i, module in handle.dropped:
        stand_in = handle.stand_ins.get(i)
        _add_hook(record, hooked, module, hooks.SkipHook(gate, None if stand_in is None else stand_in.module))
    # the hooks on an offloaded layer's module run in this order: DeviceHook, its mover's hook (session
    # mode; stream mode's go on its Linear modules), ResidualHook
    if not plan.single_device:
        skip_keys = getattr(model, "_skip_keys_device_placement", None)
        for layer in handle.layers:
            _add_hook(record, hooked, layer.module, hooks.DeviceHook(gate, layer.device, skip_keys))
    for device, units in _by_device(handle.units).items():
        mover: Mover
        if config.mode == "stream":
            mover = Ring(units, config.prefetch, device, handle.check_device_room)
        else:
            mover = Residency(units, device, handle.check_device_room, handle.stats)
        gate.movers.append(mover)
        record.did(f"the mover on {device}", mover.close)
        on_main = normalize_device(device) == normalize_device(plan.main_device)
        if isinstance(mover, Ring) and handle.host_embeddings is not None and on_main:
            handle.host_embeddings.carrier = mover  # it carries the lm_head's copy made ahead
        for pos, unit in enumerate(units):
            _hook_unit(gate, record, hooked, unit, mover, pos)
    if 0 < config.alpha < 1:
        for layer in handle.layers:
            _add_hook(record, hooked, layer.module, hooks.ResidualHook(gate, config.alpha))
    base = model.get_submodule(plan.layer_prefix.rpartition(".")[0])
    ancestors = _ancestors(model, plan.layer_prefix)
    handle.entry = ModelEntry(
        gate, model, base, handle.layers, handle.stand_ins, plan.main_device, ancestors, handle.host_embeddings
    )
    record.did("the model entry", handle.entry.remove)
    handle.entry.install()
    mlp_chunk = plan.budget.mlp_chunk if plan.budget is not None else None
    if mlp_chunk:
        handle.mlp_chunks = MlpChunks([m for m in map(dense_mlp, layer_list) if m is not None], mlp_chunk)
        record.did("prefill MLPs in chunks of positions", handle.mlp_chunks.remove)
        handle.mlp_chunks.install()
    if config.decode == "graph":
        handle.graphs = DecodeGraphs(gate, model, plan.main_device, handle.host_embeddings)
        record.did("decode steps replayed as CUDA graphs", handle.graphs.remove)
        handle.graphs.install()
        handle.report.graphs = handle.graphs


def _add_hook(record, hooked: set, module, hook) -> None:
    """Chain ``hook`` on ``module``; the first of lp_plugin's hooks on a module records their removal."""
    if id(module) not in hooked:
        hooked.add(id(module))
        record.did(f"lp_plugin's hooks on a {type(module).__name__}", functools.partial(hooks.remove, module))
    hooks.add(module, hook)


def _hook_unit(gate, record, hooked, unit, mover, pos):
    """The hooks every unit gets: the state-dict hooks and the hooks of the mover that moves it."""
    # state_dict() reads the tier's copy in standby (and inside a ring, whose slots hold other units'
    # bytes between uses): it is checked against its file first
    for torch_hook in (
        unit.module.register_state_dict_pre_hook(lambda *a, u=unit: u.show_standby()),
        unit.module.register_state_dict_post_hook(lambda *a, u=unit: u.show_bound()),
    ):
        record.did(f"a state-dict hook on layer {unit.index}", torch_hook.remove)
    for module, hook in mover.layer_hooks(pos, gate):
        _add_hook(record, hooked, module, hook)


def _restore(layers) -> None:
    """Give each offloaded layer independent tensors again, read from its tier."""
    for device, group in _by_device(layers).items():
        with Stager(group, device.type == "cuda", device) as stager:
            for layer in group:
                layer.restore(stager.source(layer))


def _by_device(units) -> dict:
    """device -> its units, in execution order."""
    out = {}
    for unit in units:
        out.setdefault(unit.device, []).append(unit)
    return out


def _ancestors(model, prefix):
    parts = prefix.split(".")
    return [model] + [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts) + 1)]


def _computing_map(device_map: dict, plan) -> dict:
    """``hf_device_map`` as it is once attached: each offloaded layer computes on its device."""

    def where(key, value):
        for i in plan.offloaded:
            prefix = f"{plan.layer_prefix}.{i}"
            if value in ("cpu", "disk") and (key == prefix or key.startswith(prefix + ".")):
                return map_value(plan.device_of(i))
        return value

    return {k: where(k, v) for k, v in device_map.items()}
