"""Which half of a skipped layer the other domains miss: its attention or its MLP (the bundled model, CPU).

For the same layer sets as ``skip_ridge_domains.py`` one half of each layer is replaced and the other kept:
``mlp`` replaces each layer's MLP by a linear map of its normed input (the attention still runs), ``attention``
replaces the attention by a linear map of its normed input (the MLP still runs), ``cutK`` replaces the attention so
and keeps only K of the MLP's channels: those of most mean ``|act(gate) * up| * |down column|`` on the calibration,
the dropped channels' mean output added as a bias (as many weights as a linear stand-in at K = hidden / 3). The maps
are fitted in layer order by
:func:`lp_plugin.planning.skipping.standins.fit` (``x -> x + W x + b`` with each output's ridge strength by window
cross-validation) on the default calibration, from the half's own input to its input plus its output, each with the
earlier halves already replaced. Every evaluation slice is scored. A probe: lp_plugin's ``skip`` drops whole layers.

    python benchmarks/skip_sublayer_probe.py --sets 10%,20% --halves mlp,attention --out r.json
    python benchmarks/skip_sublayer_probe.py --sets 10% --halves cut192,cut384 --out r2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn as nn
from skip_ridge_domains import bundled_slices, out_error, rises

SETS = {"10%": [14, 15, 25], "20%": [4, 5, 14, 15, 25, 28]}


class LinearHalf(nn.Module):
    """``W n + b``: what the replaced half adds to the residual stream, from its normed input ``n``."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight.float()), nn.Parameter(bias.float())

    def forward(self, n):
        return n @ self.weight.T + self.bias


class AttentionStandIn(nn.Module):
    """In place of a layer's attention module: the linear half and no attention weights."""

    def __init__(self, half):
        super().__init__()
        self.linear = half

    def forward(self, hidden_states, *args, **kwargs):
        return self.linear(hidden_states), None


class CutMLP(nn.Module):
    """A layer's MLP with only channels ``keep`` (copies of their weights), plus ``bias``."""

    def __init__(self, mlp, keep, bias):
        super().__init__()
        self.gate = nn.Parameter(mlp.gate_proj.weight[keep].detach().clone())
        self.up = nn.Parameter(mlp.up_proj.weight[keep].detach().clone())
        self.down = nn.Parameter(mlp.down_proj.weight[:, keep].detach().clone())
        self.bias, self.act = nn.Parameter(bias.float()), mlp.act_fn

    def forward(self, n):
        return (self.act(n @ self.gate.T) * (n @ self.up.T)) @ self.down.T + self.bias


def cut_mlp(mlp, inputs, k: int) -> CutMLP:
    """``mlp`` cut to its ``k`` channels of most mean ``|act(gate) * up| * |down column|`` over ``inputs`` (its normed
    inputs, one tensor per window), the dropped channels' mean output over them as the bias."""
    down = mlp.down_proj.weight.detach()
    with torch.no_grad():
        hs = [mlp.act_fn(n @ mlp.gate_proj.weight.T) * (n @ mlp.up_proj.weight.T) for n in inputs]
        tokens = sum(h.shape[0] for h in hs)
        score = sum(h.abs().double().sum(0) for h in hs) / tokens * down.norm(dim=0).double()
        keep = score.argsort(descending=True)[:k]
        dropped = torch.ones_like(score, dtype=torch.bool)
        dropped[keep] = False
        bias = sum((h[:, dropped] @ down[:, dropped].T).double().sum(0) for h in hs) / tokens
    return CutMLP(mlp, keep, bias)


def _collect(model, windows, prefix, module):
    """(input, output) of ``module`` on every calibration window (float32, per window)."""
    got = []

    def hook(mod, args, kwargs, output):
        n = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        got.append((n[0].detach().float(), out[0].detach().float()))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for w in windows:
                model(torch.tensor([[prefix, *w[:-1]]]), use_cache=False)
    finally:
        handle.remove()
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="10%,20%", help="shares of " + ", ".join(SETS).replace("%", "%%"))
    ap.add_argument("--halves", default="mlp,attention", help="mlp | attention | cutK (K channels), comma-separated")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    halves = args.halves.split(",")
    named = all(h in ("mlp", "attention") or (h[:3] == "cut" and h[3:].isdigit() and int(h[3:]) > 0) for h in halves)
    if not all(k in SETS for k in args.sets.split(",")) or not named:
        print(f"error: --sets is a list of {', '.join(SETS)} and --halves of mlp, attention, cutK", file=sys.stderr)
        return 2
    if why := out_error(args.out):
        print(why, file=sys.stderr)
        return 2
    from lp_plugin.planning.skipping import standins
    from lp_plugin.planning.skipping.calib import calibration
    from lp_plugin.planning.skipping.spec import StandInSpec

    model, prefix, docs, plain = bundled_slices("skip_sublayer_probe")
    windows = calibration(model, "mix").windows
    layers_of = model.model.layers
    rows = []
    for share in args.sets.split(","):
        for half in halves:
            t0 = time.perf_counter()
            saved = []
            for i in SETS[share]:
                layer = layers_of[i]
                name = "mlp" if half == "mlp" else "self_attn"
                pairs = _collect(model, windows, prefix, getattr(layer, name))  # each half reads its normed input
                tensors, _ = standins.fit(StandInSpec("linear"), [n for n, _ in pairs], [n + o for n, o in pairs])
                linear = LinearHalf(tensors["weight"], tensors["bias"])
                saved.append((layer, name, getattr(layer, name)))
                setattr(layer, name, linear if half == "mlp" else AttentionStandIn(linear))
                if half.startswith("cut"):  # the MLP's inputs with this layer's attention replaced
                    inputs = [n for n, _ in _collect(model, windows, prefix, layer.mlp)]
                    saved.append((layer, "mlp", layer.mlp))
                    layer.mlp = cut_mlp(layer.mlp, inputs, int(half[3:]))
            rise = rises(model, prefix, docs, plain)
            for layer, name, original in reversed(saved):
                setattr(layer, name, original)
            worst = max(rise, key=rise.get)
            rows.append({"share": share, "layers": SETS[share], "half": half, "rise": rise, "worst": worst,
                         "seconds": time.perf_counter() - t0})
            print(f"{share:4s} {half:10s} worst {rise[worst]:+.1%} ({worst})  "
                  + "  ".join(f"{n} {r:+.1%}" for n, r in rise.items()), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": "bundled SmolLM2-135M-Instruct, float32, CPU, 1 torch thread", "calib": "mix",
                       "plain_ppl": plain, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
