"""Do linear stand-ins hold on another text domain when fitted end to end (a probe; lp_plugin does not offer it)?

The default stand-ins are fitted layer by layer in closed form to the plain model's hidden states. Here the same
stand-ins (same layers, started from that closed-form fit on the default calibration ``mix``) are then fitted by
Adam to the model's whole output: the loss is the KL divergence from the plain model's next-token distribution to
the skipped model's, over every position of the calibration windows, with every weight of the model frozen and only
the stand-ins' ``W`` and ``b`` trained. Every evaluation slice is scored after each epoch. The bundled SmolLM2-135M
on the CPU, float32.

    python benchmarks/skip_e2e_probe.py --sets 10%,20% --epochs 4 --threads 2 \\
        --out benchmarks/results/cpu-skipping-e2e-fit.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch
from skip_ridge_domains import SETS, bundled_slices, out_error, rises


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="10%,20%", help="shares of " + ", ".join(SETS).replace("%", "%%"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--tokens", type=int, default=12288, help="calibration tokens (mix:TOKENS)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if (not all(k in SETS for k in args.sets.split(",")) or args.epochs < 1 or args.lr <= 0 or args.tokens < 1024
            or args.threads < 1):
        print(f"error: --sets is a list of {', '.join(SETS)}; --epochs >= 1, --lr > 0, --tokens >= 1024, "
              "--threads >= 1", file=sys.stderr)
        return 2
    if why := out_error(args.out):
        print(why, file=sys.stderr)
        return 2
    os.environ["LP_PLUGIN_CACHE"] = tempfile.mkdtemp(prefix="lp-e2e-")
    import lp_plugin
    from lp_plugin.planning.skipping import domains
    from lp_plugin.planning.skipping.calib import split_windows, tokenizer_for

    model, prefix, docs, plain = bundled_slices("skip_e2e_probe")
    torch.set_num_threads(args.threads)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    tok = tokenizer_for(model, "skip_e2e_probe")
    windows = [torch.tensor([[prefix, *w]]) for w in split_windows(domains.mix_ids(tok, args.tokens), domains.WINDOW)]
    print("plain", {k: round(v, 3) for k, v in plain.items()}, f"{len(windows)} windows", flush=True)
    rows = []

    def score(share, layers, epoch, loss, t0):
        with torch.no_grad():
            rise = rises(model, prefix, docs, plain)
        worst = max(rise, key=rise.get)
        rows.append({"share": share, "layers": layers, "epoch": epoch, "train_kl": loss, "rise": rise,
                     "worst": worst, "seconds": time.perf_counter() - t0})
        print(f"{share:4s} epoch {epoch} kl {loss if loss is None else round(loss, 4)} worst {rise[worst]:+.1%} "
              f"({worst})  " + "  ".join(f"{n} {r:+.1%}" for n, r in rise.items()), flush=True)

    for p in model.parameters():
        p.requires_grad_(False)
    for share, layers in ((k, SETS[k]) for k in args.sets.split(",")):
        t0 = time.perf_counter()
        handle = lp_plugin.attach(model, offload="none", skip=layers, stand_in="linear", calib=f"mix:{args.tokens}")
        params = [p for s in handle.stand_ins.values() for p in s.module.parameters()]
        score(share, layers, 0, None, t0)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=args.lr)
        for epoch in range(1, args.epochs + 1):
            total = 0.0
            for i in torch.randperm(len(windows), generator=torch.Generator().manual_seed(epoch)).tolist():
                with torch.no_grad():
                    target = torch.log_softmax(teacher(windows[i], use_cache=False).logits[0].float(), -1)
                with lp_plugin.session(model):  # backward through the stand-ins' hooks needs one session
                    logp = torch.log_softmax(model(windows[i], use_cache=False).logits[0].float(), -1)
                    loss = torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean")
                    opt.zero_grad()
                    loss.backward()
                opt.step()
                total += loss.item()
            score(share, layers, epoch, total / len(windows), t0)
        for p in params:
            p.requires_grad_(False)
        handle.detach()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": "bundled SmolLM2-135M-Instruct, float32, CPU", "calib": f"mix:{args.tokens}",
                       "lr": args.lr, "epochs": args.epochs, "torch_threads": args.threads, "plain_ppl": plain,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
