"""``lp-prune``: sweep the share of layers skipped x selection x stand-in and draw the quality frontier.

    lp-prune --model "$(python -m lp_plugin bundled-model)" --out benchmarks/results/cpu-smollm2-prune

writes ``OUT.json`` (every row: held-out perplexity, tok/s, standby/peak VRAM, bytes moved per token,
the layers chosen and how the stand-ins were fitted), ``OUT.txt`` (the tables and the targets) and
``OUT.png`` (perplexity against layers skipped and against VRAM; needs matplotlib, the ``plot``
extra). Arguments, the engine options and the output folder are checked before any work. Exit
status: 0 no target missed (a target whose share the sweep did not measure is reported as not
measured), 1 a target missed, 2 bad arguments or a model that cannot be loaded.

Time: the sweep loads and scores one row per (share, selection, stand-in), and greedy measures every
remaining layer at every step, once per stand-in kind. On the CPU it takes hours for the defaults:
the estimate printed at the start (and :func:`estimate_seconds`) scales a measured run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ...core.progress import enabled as progress_enabled
from ...core.report import jsonable
from ...errors import LPPluginError
from ...planning.skipping.calib import HELDOUT, WINDOW
from ...planning.skipping.domains import SLICES
from ...planning.skipping.spec import check_calib, parse_stand_in
from .. import Parser, check_writable
from ..shapes import _HUB_ID
from . import frontier
from .sweep import FRACTIONS, SELECTIONS, STAND_INS

# measured runs: SmolLM2-135M (135M parameters), fp32, 2 shared CPU cores (one torch thread, load average 2-4),
# default calibration: greedy:20% (6 steps, 165 candidates, kl score) took 474 s of steps; a sweep row
# (load, fit the stand-ins, score the five slices) took about 57 s (ten rows in 570 s)
_MEASURED_PARAMS = 135e6
_GREEDY_S_PER_CANDIDATE = 474 / 165  # per candidate: scoring reads a fixed 8 windows, whatever the calibration size
_ROW_S = 57.0  # per sweep row


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _list(text: str) -> list:
    return [p.strip() for p in text.split(",") if p.strip()]


TARGETS = ",".join(f"{k:g}:{v:g}" for k, v in frontier.DEFAULT_TARGETS.items())  # --targets' default


def _once(flag: str, items: list) -> list:
    """``items`` when each appears once; a repeat would sweep (and time) the same row twice."""
    seen = set()
    for item in items:
        if item in seen:
            raise ValueError(f"{flag} names {item!r} twice; list each once")
        seen.add(item)
    return items


def _fractions(text: str) -> list:
    out = []
    for item in _list(text):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(
                f"--fractions: {item!r} is not a number; write shares in percent, e.g. 0,10,20,30"
            ) from None
        if not 0 <= value < 100:
            raise ValueError(f"--fractions: {item!r} is not a share in [0, 100); e.g. 0,10,20,30")
        out.append(value)
    if not out:
        raise ValueError("--fractions is empty; e.g. 0,10,20,30")
    return out


def _selections(text: str) -> list:
    from ...planning.plugins import skip_policy_names

    names = _list(text)
    unknown = [n for n in names if n not in skip_policy_names()]
    if unknown or not names:
        raise ValueError(
            f"--selections: unknown skip policy {unknown[0] if unknown else '(none)'!r}; choose from "
            f"{skip_policy_names()} (or install a plugin that registers one)"
        )
    return _once("--selections", names)


def _engine(args) -> dict:
    """The engine options of every row, checked now against the model's config (not after the slow
    greedy pass)."""
    from transformers import AutoConfig

    from ...integrations.checks import check_options
    from ...planning.config import OffloadConfig
    from ...planning.plan import OffloadPlan

    engine = {
        "offload": args.offload,
        "mode": args.mode,
        "tier": args.tier,
        "offload_folder": args.offload_folder,
        "main_device": args.device,
    }
    config = OffloadConfig(**engine)
    check_options(config, args.model, device_option=("--device", "--device cpu"))
    OffloadPlan.for_config(AutoConfig.from_pretrained(args.model), config)
    return engine


def _check_window(args) -> None:
    """A held-out window the model's positions cannot hold is refused before the sweep."""
    from transformers import AutoConfig

    positions = getattr(AutoConfig.from_pretrained(args.model), "max_position_embeddings", None)
    if isinstance(positions, int) and args.heldout_window > positions:
        raise ValueError(
            f"--heldout-window {args.heldout_window} is longer than the model's {positions} positions; "
            f"use at most {positions} (default {WINDOW})"
        )


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "the frontier plot needs matplotlib: pip install 'lp_plugin[plot]', or pass --no-plot"
        ) from None


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _check_model(model: str) -> None:
    """A path must be a model folder (with config.json); anything else is taken as a hub id."""
    hint = "pass a transformers model folder or a hub id (e.g. $(python -m lp_plugin bundled-model))"
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"--model {model!r} is a folder without config.json; {hint}")
    elif model.startswith(("/", ".", "~")) or os.path.exists(model) or not _HUB_ID.fullmatch(model):
        raise ValueError(f"--model {model!r} is neither a model folder nor a Hub id (owner/name); {hint}")


def _slices(text: str) -> list:
    """The evaluation slices named in ``text``, each domain's text read now (a domain this Python
    lacks is refused before any work)."""
    from ...planning.skipping import domains

    names = _once("--domains", _list(text))
    unknown = [n for n in names if n not in SLICES]
    if unknown:
        raise ValueError(f"--domains: unknown slice {unknown[0]!r}; choose from {list(SLICES)}")
    for name in names:
        domains.text(SLICES[name].domain)
    return names


def estimate_seconds(num_layers: int, params: float, calib, counts, selections, stand_ins, greedy_stand_ins) -> float:
    """A rough CPU time for the sweep, scaled from the measured runs by parameters (greedy scores a fixed
    number of calibration windows, so the calibration's size hardly matters)."""
    scale = params / _MEASURED_PARAMS
    rows = 1 + sum(len(greedy_stand_ins if sel == "greedy" else stand_ins) for k in counts if k for sel in selections)
    steps = max(counts, default=0) if "greedy" in selections else 0
    candidates = sum(num_layers - s for s in range(steps)) * len(greedy_stand_ins)
    return rows * _ROW_S * scale + candidates * _GREEDY_S_PER_CANDIDATE * scale


def _params(config) -> float:
    h, n = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * h)
    return n * (4 * h * h + 3 * h * inter) + config.vocab_size * h


def _time_help() -> str:
    counts = [0, 3, 6, 9, 12]  # the default shares of a 30-layer model

    def minutes(calib, greedy):
        return estimate_seconds(30, _MEASURED_PARAMS, calib, counts, SELECTIONS, STAND_INS, greedy) / 60

    return (
        f"time: on the CPU the sweep takes long. Rough estimates for SmolLM2-135M (fp32, 2 shared cores): the defaults "
        f"about {minutes(None, STAND_INS):.0f} minutes, or {minutes(None, ['linear']):.0f} with --greedy-stand-ins "
        f"linear (greedy runs once per stand-in "
        "kind and is the slow part). The estimate for your run is printed when it starts; a GPU is far faster."
    )


def build_parser(prog: str = "lp-prune") -> argparse.ArgumentParser:
    from ...__main__ import plain_text

    p = Parser(prog=prog, description=plain_text(__doc__.split("\n\n")[0]), epilog=_time_help())
    p.add_argument(
        "--model", required=True, help="a transformers folder or Hub id owner/name (its tokenizer is needed)"
    )
    p.add_argument("--out", required=True, help="output path without extension: OUT.json, OUT.txt, OUT.png")
    p.add_argument(
        "--fractions",
        default=",".join(map(str, FRACTIONS)),
        help="shares of the layers to skip, in %% (default %(default)s)",
    )
    p.add_argument("--selections", default=",".join(SELECTIONS), help="skip policies (default %(default)s)")
    p.add_argument("--stand-ins", default=",".join(STAND_INS), help="stand-in kinds (default %(default)s)")
    p.add_argument(
        "--greedy-stand-ins",
        default=None,
        help="stand-in kinds of the greedy rows (default: --stand-ins); each kind runs greedy once, "
        "the sweep's slow part",
    )
    p.add_argument(
        "--calib",
        default=None,
        help="calibration data: mix (default: 12288 tokens of pydoc, IDLE's news and "
        "stdlib code), mix:TOKENS, pydoc, pydoc:TOKENS or a text file",
    )
    p.add_argument(
        "--offload", default="even", help="offload spec of every row (default %(default)s; 'none' for no offloading)"
    )
    p.add_argument(
        "--mode", default="stream", choices=("session", "stream"), help="engine mode of every row (default %(default)s)"
    )
    p.add_argument(
        "--tier", default="cpu", help="where offloaded layers live: cpu (pinned host memory; default) or disk"
    )
    p.add_argument(
        "--offload-folder", default=None, help="the disk tier's folder (default: a temporary folder, removed at exit)"
    )
    p.add_argument("--device", default=None, help="main device (default: the current GPU, else the CPU)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights' dtype (default %(default)s)")
    p.add_argument(
        "--domains",
        default=",".join(SLICES),
        help="evaluation slices besides the calibration slice (default %(default)s: two held-out pydoc "
        "slices and two domains the default calibration never reads); the verdict uses the worst",
    )
    p.add_argument(
        "--heldout-window",
        type=int,
        default=WINDOW,
        help="tokens per held-out document (default %(default)s; at most the model's context)",
    )
    p.add_argument(
        "--targets",
        default=TARGETS,
        help="SHARE:RISE pairs in %%: the best row at each share must raise perplexity by at most RISE "
        "(default %(default)s)",
    )
    p.add_argument("--no-plot", action="store_true", help="write no PNG (then matplotlib is not needed)")
    return p


def main(argv=None, prog: str = "lp-prune") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        targets = frontier.parse_targets(args.targets)
        fractions = _fractions(args.fractions)
        unswept = sorted(share for share in targets if float(share) not in fractions)
        if unswept and args.targets != TARGETS:  # (the default targets are judged where the sweep reaches them)
            raise ValueError(
                f"--targets names shares {unswept} that --fractions does not sweep ({args.fractions}); add them "
                "to --fractions, or drop those targets"
            )
        selections = _selections(args.selections)
        stand_ins = _once("--stand-ins", [str(parse_stand_in(s)) for s in _list(args.stand_ins)])
        greedy_stand_ins = (
            None
            if args.greedy_stand_ins is None
            else _once("--greedy-stand-ins", [str(parse_stand_in(s)) for s in _list(args.greedy_stand_ins)])
        )
        slices = _slices(args.domains)
        _check_model(args.model)
        check_calib(args.calib)
        if args.heldout_window < 2:
            raise ValueError(
                f"--heldout-window {args.heldout_window} is too short; use at least 2 tokens (default {WINDOW})"
            )
        engine = _engine(args)
        _check_window(args)
        if not args.no_plot:
            _need_matplotlib()
        check_writable("--out", f"{args.out}.json")
    except (ValueError, OSError, LPPluginError) as exc:
        print(f"lp-prune: error: {exc}", file=sys.stderr)
        return 2
    import torch

    from .sweep import run_sweep

    logging.basicConfig(format="%(message)s")
    logging.getLogger("lp_plugin").setLevel(logging.INFO)  # greedy reports each step: it can take a while
    device = engine["main_device"]
    if str(device) == "cpu" or (device is None and not torch.cuda.is_available()):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model)
        counts = sorted({int(f * config.num_hidden_layers / 100 + 0.5) for f in fractions})
        eta = estimate_seconds(
            config.num_hidden_layers,
            _params(config),
            args.calib,
            counts,
            selections,
            stand_ins,
            stand_ins if greedy_stand_ins is None else greedy_stand_ins,
        )
        print(
            f"lp-prune: estimated time on this CPU: about {eta / 60:.0f} minutes (scaled from SmolLM2-135M on 2 "
            "cores; "
            + ("progress bars follow)" if progress_enabled() else "LP_PLUGIN_PROGRESS=1 draws progress bars here)"),
            file=sys.stderr,
            flush=True,
        )

    try:
        out = run_sweep(
            args.model,
            fractions=fractions,
            selections=selections,
            stand_ins=stand_ins,
            calib=args.calib,
            engine=engine,
            greedy_stand_ins=greedy_stand_ins,
            hf_kwargs={"dtype": getattr(torch, DTYPES[args.dtype])},
            heldout=(HELDOUT[0], HELDOUT[1], args.heldout_window),
            slices=slices,
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except (LPPluginError, OSError) as exc:  # OSError: a model transformers cannot load (offline hub id, bad files)
        print(f"lp-prune: error: {exc}", file=sys.stderr)
        return 2
    out["dtype"] = args.dtype
    out["targets"] = frontier.check_targets(out, targets)
    text = frontier.table(out) + "\n" + frontier.targets_text(out["targets"])
    _write(f"{args.out}.json", json.dumps(jsonable(out), indent=1) + "\n")
    _write(f"{args.out}.txt", text)
    if not args.no_plot:
        frontier.plot(out, f"{args.out}.png")
    print(text)
    return 0 if all(t["met"] is not False for t in out["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
