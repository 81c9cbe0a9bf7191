"""What an :class:`~lp_plugin.integrations.engine.OffloadHandle` says about itself: ``info()`` (a dict),
``summary()`` (``print(handle)``), ``repr`` and the one line ``attach`` logs. Reads the plan, the offloaded
layers and the stand-ins, the tier and the session gate; changes nothing."""

from __future__ import annotations

import logging

from ..core.absent import is_absent
from ..core.gate import SessionGate
from ..core.group import execution_order
from ..core.report import layers_text, size_text
from ..core.stream import Ring
from ..planning.plan import OffloadPlan

log = logging.getLogger("lp_plugin")


class HandleReport:
    def __init__(
        self,
        model,
        plan: OffloadPlan,
        layers: list,
        stand_ins: dict,
        dropped: list,
        tier,
        gate: SessionGate,
        host_embeddings=None,
    ):
        self.model = model
        self.plan = plan
        self.config = plan.config
        self.graphs = None  # decode="graph": the DecodeGraphs whose counts info() shows (set once installed)
        self.layers = layers  # [OffloadedLayer]: the model's offloaded layers, execution order
        self.stand_ins = stand_ins  # {index: StandIn}
        self.dropped = dropped  # [(index, module)]
        self.tier = tier
        self.gate = gate
        self.host_embeddings = host_embeddings  # HostEmbeddings (embeddings="host"), else None

    @property
    def layer_indices(self) -> list[int]:
        """The offloaded layers (not the stand-ins), in execution order."""
        return [l.index for l in self.layers]

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of the offloaded layers (not the stand-ins) held by the tier."""
        return sum(l.nbytes for l in self.layers)

    def _pinned_cache_bytes(self) -> int:
        pinned = getattr(self.tier, "pinned_cache_bytes", None)
        return pinned() if pinned is not None else 0

    def without_weights(self) -> list[int]:
        """Skipped layers whose weights the model does not hold (never read, or freed once chosen)."""
        return [i for i, module in self.dropped if is_absent(module)]

    def info(self) -> dict:
        c = self.config
        units = execution_order(self.layers, self.stand_ins)
        offloaded = sum(u.nbytes for u in units)  # what the tier holds and a stream-mode forward moves
        read, read_direct = self.tier.bytes_read()
        return {
            "offload": c.offload if isinstance(c.offload, str) else ",".join(map(str, c.offload)),
            "layers": list(self.plan.selected),
            "offloaded_layers": self.layer_indices,
            "dropped_layers": [i for i, _ in self.dropped],
            "skipped_layers": list(self.plan.skips.layers),
            "skipped_without_weights": self.without_weights(),
            "stand_ins": {str(i): type(s.module).__name__ for i, s in self.stand_ins.items()},
            "tier": c.tier,
            "mode": c.mode,
            "alpha": c.alpha,
            "prefetch": c.prefetch,
            "offload_folder": getattr(self.tier, "offload_folder", None) or c.offload_folder,
            "main_device": str(self.plan.main_device),
            "protect_first": c.protect_first,
            "protect_last": c.protect_last,
            "offloaded_bytes": offloaded,
            "layer_bytes": max((u.nbytes for u in units), default=0),
            "bytes_per_forward": offloaded if c.mode == "stream" else 0,
            "bytes_read": read,  # from the tier's files by transfers so far (disk tier)
            "bytes_read_direct": read_direct,  # of those, past the page cache
            "pinned_cache_bytes": self._pinned_cache_bytes(),  # the files' cached pages transfers copy from
            "ring_slots": sum(m.nslots for m in self.gate.movers if isinstance(m, Ring)),
            "devices": sorted({str(u.device) for u in units}) or [str(self.plan.main_device)],
            "embeddings": c.embeddings,
            "embeddings_host_bytes": self.host_embeddings.host_bytes if self.host_embeddings else 0,
            "lm_head_bytes_per_call": self.host_embeddings.head_bytes if self.host_embeddings else 0,
            "embeddings_tied": self.host_embeddings.tied if self.host_embeddings else None,
            "lm_head_copies": self.host_embeddings.head_copies if self.host_embeddings else 0,
            "lm_head_copies_ahead": self.host_embeddings.head_copies_ahead if self.host_embeddings else 0,
            "budget": self.plan.budget.summary() if self.plan.budget is not None else None,
            "decode": {"mode": c.decode, **(self.graphs.stats.as_dict() if self.graphs is not None else {})},
        }

    def repr(self) -> str:
        c = self.config
        state = "" if self.gate.attached else ", detached"
        return (
            f"OffloadHandle(layers={list(self.plan.selected)}, tier={c.tier!r}, mode={c.mode!r}, "
            f"alpha={c.alpha}, offloaded={size_text(self.offloaded_bytes)!r}{state})"
        )

    def summary(self) -> str:
        """What ``print(handle)`` shows: what was offloaded, where it lives, what stays and moves."""
        c, offloaded = self.config, self.offloaded_bytes
        total = self.plan.num_layers
        main_device = self.plan.main_device
        model_bytes = sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()])
        what = (
            "exact" if c.alpha == 1 else "drops the layers" if c.alpha == 0 else f"scaled residual, alpha {c.alpha:g}"
        )
        skipped = len(self.plan.skips.layers)
        if skipped:  # the offloaded layers may run exactly; the model does not
            what = f"{skipped} layers skipped: not the plain model" if c.alpha == 1 else f"{what}; {skipped} skipped"
        lines = [
            f"lp_plugin: {len(self.layer_indices)} of {total} layers offloaded to the {c.tier} tier, {c.mode} mode "
            f"({what})"
        ]
        if not self.gate.attached:
            return lines[0].replace("offloaded", "were offloaded", 1) + "; detached: the plain model again"
        rows = [
            ("offloaded", f"layers {layers_text(self.layer_indices)}: {size_text(offloaded)}"),
            ("resident", f"{size_text(max(model_bytes - offloaded, 0))} on {main_device}"),
        ]
        if self.host_embeddings is not None:
            rows.append(
                (
                    "embeddings",
                    f"input embeddings and lm_head{' (tied)' if self.host_embeddings.tied else ''} in host memory: "
                    f"{size_text(self.host_embeddings.host_bytes)}; lm_head copied to {main_device} per call "
                    f"({size_text(self.host_embeddings.head_bytes)})",
                )
            )
        if c.mode == "stream":
            rows.append(("per forward", f"{size_text(offloaded)} copied to {main_device} (ring of {c.prefetch + 1})"))
        if self.plan.skips.layers:
            stand_ins = {type(s.module).__name__ for s in self.stand_ins.values()}
            hows = sorted({module._lp_absent_how for _, module in self.dropped if is_absent(module)})
            rows.append(
                (
                    "skipped",
                    f"layers {layers_text(self.plan.skips.layers)}"
                    + (f" (stand-ins: {', '.join(sorted(stand_ins))})" if stand_ins else "")
                    + (f"; weights {' / '.join(hows)}" if hows else ""),
                )
            )
        dropped = [i for i, _ in self.dropped if i not in self.plan.skips.layers]
        if dropped:
            rows.append(("dropped", f"layers {layers_text(dropped)} (alpha 0: never run)"))
        read, direct = self.tier.bytes_read()
        pinned = self._pinned_cache_bytes()
        moves = [f"from the files' cached pages, lent to CUDA ({size_text(pinned)} pinned)"] if pinned else []
        if read:
            moves.append(f"{size_text(read)} read from the files so far ({size_text(direct)} past the page cache)")
        if moves:
            rows.append(("transfers", "; ".join(moves)))
        folder = getattr(self.tier, "offload_folder", None)
        if folder:
            how = (
                "temporary: removed at detach or exit"
                if getattr(self.tier, "temporary", False)
                else "handle.detach(remove_files=True) removes them"
            )
            rows.append(("files", f"{folder} ({how})"))
        if self.plan.budget is not None:
            rows.append(("budget", "planned by offload='auto': handle.plan.budget"))
            if self.plan.budget.mlp_chunk:
                rows.append(
                    (
                        "prefill",
                        f"MLPs in chunks of {self.plan.budget.mlp_chunk:,} positions (the plan's: the whole "
                        "prefill's do not fit; same values)",
                    )
                )
        width = max(len(k) for k, _ in rows)
        return "\n".join(lines + [f"  {k.ljust(width)}  {v}" for k, v in rows])

    def log_attached(self) -> None:
        """The one line ``attach`` (and so ``from_pretrained``) logs at INFO on logger ``lp_plugin``."""
        folder = getattr(self.tier, "offload_folder", None)
        if folder and getattr(self.tier, "temporary", False):
            folder = f"{folder} (temporary)"
        taken = sum(bool(l.accel_hooks) for l in self.layers)
        log.info(
            "lp_plugin: offloaded %d of %d layers (%s) to the %s tier%s, %s mode, alpha %g%s; print(handle) for "
            "details",
            len(self.layer_indices),
            self.plan.num_layers,
            size_text(self.offloaded_bytes),
            self.config.tier,
            f" in {folder}" if folder else "",
            self.config.mode,
            self.config.alpha,
            f", taking over Accelerate's offload of {taken} of them" if taken else "",
        )
