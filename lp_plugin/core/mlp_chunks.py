"""Prefill MLPs over chunks of positions (``mlp_chunk``, chosen by the budget plan where a whole prefill does not
fit the card).

A decoder layer's dense MLP, ``down(act(gate(x)) * up(x))``, is position-wise: each position's output depends on
that position's input only. Run over ``chunk`` positions at a time it holds one chunk's three ``[rows,
intermediate]`` products instead of the whole sequence's, at long contexts the largest activation of a prefill
(about 516 MiB for the Qwen2.5-3B shape at 8192 tokens; 129 MiB in chunks of 2048). The outputs are written into
one tensor of the whole sequence's shape, so the layer gets what the whole MLP would return.

Bit for bit where the matmul kernel computes a row the same way whatever the number of rows, as cuBLAS does for
chunks of 512 rows and more on an H200 (bf16 and NF4, measured: ``benchmarks/results/h200-mlp-chunks.json``);
the planner offers chunks of :data:`MIN_MLP_CHUNK` positions and more, on CUDA only. docs/graphs.md (Memory) says
when.
"""

from __future__ import annotations

import torch
import torch.nn as nn

#: the shortest chunk (positions) the planner offers: shorter chunks may take another matmul kernel
MIN_MLP_CHUNK = 1024


def dense_mlp(layer: nn.Module) -> nn.Module | None:
    """``layer.mlp`` where it is a dense, position-wise MLP (its weights all in Linear modules, no router or
    experts), else None."""
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module):
        return None
    if any(name in ("router", "experts", "gate_proj_experts") for name, _ in mlp.named_children()):
        return None
    if any(hasattr(mlp, a) for a in ("num_experts", "top_k", "n_routed_experts")):
        return None
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    owned = {id(p) for m in linears for p in m.parameters(recurse=False)}
    loose = [p for p in mlp.parameters() if id(p) not in owned]
    return mlp if linears and not loose else None


class MlpChunks:
    """Wraps the ``forward`` of each MLP in ``mlps``: a call over more than ``chunk`` positions runs ``chunk``
    positions at a time. ``install`` / ``remove`` put the wrappers in and take them out."""

    def __init__(self, mlps: list, chunk: int):
        if chunk < 1:
            raise ValueError(f"mlp_chunk must be a positive number of positions, got {chunk}")
        self.mlps = list(mlps)
        self.chunk = int(chunk)
        self.calls = 0  # MLP calls run in chunks
        self._saved: list = []

    def install(self) -> None:
        for mlp in self.mlps:
            saved = mlp.__dict__.get("forward")
            original = mlp.forward
            mlp.forward = self._wrap(original)
            self._saved.append((mlp, saved))

    def remove(self) -> None:
        for mlp, saved in reversed(self._saved):
            if saved is not None:
                mlp.__dict__["forward"] = saved
            else:
                mlp.__dict__.pop("forward", None)
        self._saved = []

    def _wrap(self, original):
        chunk = self.chunk

        def forward(*args, **kwargs):
            x = args[0] if len(args) == 1 and not kwargs else None
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] <= chunk or torch.compiler.is_compiling():
                return original(*args, **kwargs)
            self.calls += 1
            out = None
            for start in range(0, x.shape[1], chunk):
                part = original(x[:, start : start + chunk])
                if out is None:
                    out = part.new_empty((*x.shape[:2], *part.shape[2:]))
                out[:, start : start + chunk] = part
                del part
            return out

        return forward
