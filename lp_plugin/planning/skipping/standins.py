"""Stand-ins for skipped layers, fitted in closed form on calibration activations.

A stand-in runs in place of a skipped layer inside the residual stream: ``x -> x + f(x)``.

* ``mean``: ``f(x) = b``, the mean update the layer would have made.
* ``linear``: ``f(x) = W x + b`` by ridge least squares; ``linear:R`` keeps the best rank-``R``
  ``W`` (reduced-rank regression: the full solution projected onto the top ``R`` directions of its
  fitted updates), stored as two ``R x hidden`` factors.

What is fitted, and why (compared with ReplaceMe, mts-ai/ReplaceMe): ReplaceMe removes a block of
layers and multiplies the preceding layer's MLP output by a matrix ``T`` fused into that MLP's
``down_proj``, ``T`` fitted by least squares (or by Adam on a cosine loss) so that the block's
output is matched. A per-layer residual hook sees only the residual stream ``x`` (the MLP output is
already summed in), and it must leave the model's weights untouched, so here the map acts on ``x``
itself, as ``x + W x + b``. Inputs are the activations the stand-in will really see: stand-ins are
fitted in layer order, each on the hidden states the model produces with every earlier skipped layer
already replaced. Targets are the plain model's hidden states after the layer (as ReplaceMe's are
the plain model's block outputs), so each stand-in also pulls back the drift that earlier skips
caused. The loss is squared error with every token weighted by ``1 / |target|^2``: that is the
relative error, which like ReplaceMe's cosine objective keeps the few tokens with huge activations
(the first token of a document) from dominating, and it stays closed form, so no optimizer, step
size or iteration count is involved. The ridge strength of each output is chosen by
cross-validation over the calibration windows (leave whole windows out), so no setting is tuned on
evaluation text.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .spec import StandInSpec

RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridge strengths tried, relative to the mean input power
FOLDS = 4
SETTINGS = {
    "fit": "ridge, 1/|target|^2 token weights, per-output strength by window cross-validation",
    "ridge_grid": list(RIDGE_GRID),
    "ridge_folds": FOLDS,
}  # part of every cache key


class MeanStandIn(nn.Module):
    """``x + b``."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        return x + self.bias.to(x.dtype)


class LinearStandIn(nn.Module):
    """``x + W x + b``; with ``down``/``up`` factors ``W = up @ down`` (low rank)."""

    def __init__(self, bias: torch.Tensor, weight: torch.Tensor | None = None, down=None, up=None):
        super().__init__()
        self.bias = nn.Parameter(bias, requires_grad=False)
        if weight is not None:
            self.weight = nn.Parameter(weight, requires_grad=False)
        else:
            self.down = nn.Parameter(down, requires_grad=False)
            self.up = nn.Parameter(up, requires_grad=False)

    @property
    def rank(self):
        return None if "weight" in self._parameters else self.down.shape[0]

    def forward(self, x):
        if "weight" in self._parameters:
            return x + nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))
        update = nn.functional.linear(
            nn.functional.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype), self.bias.to(x.dtype)
        )
        return x + update


def build(spec: StandInSpec, tensors: dict) -> nn.Module:
    """A stand-in of ``spec`` from its named tensors (as :func:`fit` made them, or a cache file)."""
    if spec.kind == "mean":
        return MeanStandIn(tensors["bias"])
    return LinearStandIn(**tensors)


class Stats:
    """Weighted sums over some tokens, each input ``x`` augmented by a constant 1 (the bias), each
    token weighted by ``1 / |target|^2``: everything a fit needs, and additive over windows, so
    cross-validation folds are sums of per-window statistics."""

    def __init__(self, gram, cross, sq):
        self.gram, self.cross, self.sq = gram, cross, sq  # sum w a a^T, sum w a r^T, sum w r^2 per output

    @classmethod
    def of(cls, inputs: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype = torch.float64) -> Stats:
        """The sums over one window's tokens, computed in ``dtype`` and held in float64."""
        x = inputs.detach().to("cpu", dtype)
        t = targets.detach().to("cpu", dtype)
        r = t - x
        w = 1.0 / t.pow(2).sum(-1).clamp_min(1e-12)
        a = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        sums = (a.T @ (w[:, None] * a), a.T @ (w[:, None] * r), w @ r.pow(2))
        return cls(*(v.to(torch.float64) for v in sums))

    def __add__(self, other: Stats) -> Stats:
        return Stats(self.gram + other.gram, self.cross + other.cross, self.sq + other.sq)

    def solve(self, alpha: float) -> torch.Tensor:
        """``[hidden + 1, hidden]`` coefficients (the last row is the bias) of ridge strength ``alpha``,
        relative to the mean input power; the bias is not penalized."""
        d = self.gram.shape[0] - 1
        penalty = torch.ones(d + 1, dtype=self.gram.dtype)
        penalty[d] = 0
        scale = alpha * self.gram.diagonal()[:d].mean()
        return torch.linalg.solve(self.gram + torch.diag(scale * penalty), self.cross)

    def errors(self, coef: torch.Tensor) -> torch.Tensor:
        """Weighted squared error of ``coef`` on these tokens, per output."""
        return self.sq - 2 * (coef * self.cross).sum(0) + (coef * (self.gram @ coef)).sum(0)

    def mean_coef(self) -> torch.Tensor:
        """Coefficients of the best constant update (the weighted mean of the updates)."""
        coef = torch.zeros_like(self.cross)
        coef[-1] = self.cross[-1] / self.gram[-1, -1]
        return coef


def ridge_fit(stats: list) -> tuple:
    """Ridge coefficients with each output's strength chosen from :data:`RIDGE_GRID` by the least
    held-out error, folds made of whole calibration windows (one window: the middle of the grid).
    Returns ``(coefficients, chosen strength per output)``. Outputs are fitted independently, so
    each gets its own strength: a few high-variance outputs must not set the shrinkage of the many
    small ones that the next layers still read after their norm."""
    total = sum(stats[1:], stats[0])
    folds = min(FOLDS, len(stats))
    if folds < 2:
        alpha = RIDGE_GRID[len(RIDGE_GRID) // 2]
        return total.solve(alpha), torch.full((total.cross.shape[1],), alpha, dtype=torch.float64)
    return best_per_output(
        total, held_out_errors(stats, [i % folds for i in range(len(stats))], RIDGE_GRID), RIDGE_GRID
    )


def best_per_output(total: Stats, errors: torch.Tensor, grid) -> tuple:
    """``(coefficients, strength per output)``: each output fitted on ``total`` with the strength of ``grid`` whose
    held-out error (``errors``, ``[len(grid), outputs]``) is least."""
    best = errors.argmin(0)
    solutions = torch.stack([total.solve(alpha) for alpha in grid])  # [grid, in + 1, out]
    columns = torch.arange(total.cross.shape[1])
    return solutions[best, :, columns].T, torch.tensor(grid, dtype=torch.float64)[best]


def held_out_errors(stats: list, fold_of: list, grid) -> torch.Tensor:
    """``[len(grid), outputs]``: each strength's error per output on every fold's windows, fitted on the
    other folds' windows (``fold_of[i]`` is window ``i``'s fold), summed over the folds."""
    errors = torch.zeros(len(grid), stats[0].cross.shape[1], dtype=torch.float64)
    for k in sorted(set(fold_of)):
        train = [s for s, f in zip(stats, fold_of) if f != k]
        test = [s for s, f in zip(stats, fold_of) if f == k]
        train, test = sum(train[1:], train[0]), sum(test[1:], test[0])
        for j, alpha in enumerate(grid):
            errors[j] += test.errors(train.solve(alpha))
    return errors


def _low_rank(total: Stats, coef: torch.Tensor, rank: int) -> torch.Tensor:
    """``coef`` with its map projected onto the ``rank`` directions of largest fitted-update variance,
    and the bias refitted for that map."""
    d = coef.shape[1]
    n = total.gram[d, d]
    mean_a = total.gram[d] / n
    scatter = total.gram - n * torch.outer(mean_a, mean_a)  # weighted scatter of the inputs (last row 0)
    weight = coef[:d]  # [in, out]
    _, vecs = torch.linalg.eigh(weight.T @ scatter[:d, :d] @ weight)
    top = vecs[:, -rank:]  # [out, rank]
    projected = weight @ top @ top.T
    bias = total.cross[d] / n - mean_a[:d] @ projected
    return torch.cat([projected, bias[None]])


def fit(
    spec: StandInSpec,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    alpha: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Fit one stand-in: ``inputs``/``targets`` are per-window ``[tokens, hidden]`` tensors (what the
    stand-in sees, what should come out); ``alpha`` fixes the ridge strength of every output instead
    of choosing it by cross-validation; ``dtype`` is the precision of each window's sums (float32
    suffices for a strong fixed ``alpha``, which keeps the system well conditioned; the solve is in
    float64). Returns ``(named tensors, fit details)``."""
    stats = [Stats.of(x, t, dtype) for x, t in zip(inputs, targets)]
    total = sum(stats[1:], stats[0])
    details: dict[str, float] = {}
    if spec.kind == "mean":
        coef = total.mean_coef()
    elif alpha is not None:
        coef = total.solve(alpha)
        details["ridge_median"] = float(alpha)
        if spec.rank is not None and spec.rank < coef.shape[1]:
            coef = _low_rank(total, coef, spec.rank)
    else:
        coef, alphas = ridge_fit(stats)
        details["ridge_median"] = float(alphas.median())
        if spec.rank is not None and spec.rank < coef.shape[1]:
            coef = _low_rank(total, coef, spec.rank)
    details["explained"] = float(1 - total.errors(coef).sum() / total.sq.sum().clamp_min(1e-30))  # share of the update
    d = coef.shape[1]
    bias, weight = coef[d], coef[:d].T  # [out], [out, in]
    if spec.kind == "mean":
        return {"bias": bias}, details
    if spec.rank is None or spec.rank >= d:
        return {"bias": bias, "weight": weight}, details
    _, vecs = torch.linalg.eigh(weight @ weight.T)
    up = vecs[:, -spec.rank :]  # [out, rank]: the column space of the projected map
    return {"bias": bias, "down": up.T @ weight, "up": up}, details
