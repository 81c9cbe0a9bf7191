#!/usr/bin/env bash
# Stock lm-eval on the GPU: `--model hf` vs `--model hf-residual-offload` on a random-init
# Qwen2.5-3B-shaped checkpoint saved with the bundled model's tokenizer, task lp_pydoc_ppl, bf16 and
# NF4. Writes benchmarks/results/lm_eval-<dtype>-<model>/... (lm-eval's results JSON).
#
#   TOKENIZER=DIR OUTDIR=benchmarks/results bash benchmarks/lm_eval_gpu.sh
#
# On a machine where lp_plugin is pip-installed, `lm_eval` finds hf-residual-offload through the
# package's .pth hook. On the lab GPU machine the package travels as source on PYTHONPATH (no
# install, so no .pth is processed): LM_EVAL below runs the same stock CLI after calling the hook's
# install(), which is exactly what the .pth line does at interpreter start.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TOKENIZER="${TOKENIZER:?folder with the bundled tokenizer (python -m lp_plugin bundled-model)}"
OUTDIR="${OUTDIR:-benchmarks/results}"
LIMIT="${LIMIT:-8}"
CKPT="${CKPT:-/tmp/lp-qwen2.5-3b-shape}"
LM_EVAL=(python3 -c 'import sys, lp_plugin.integrations._lm_eval_register as r; r.install(); from lm_eval.__main__ import cli_evaluate; sys.argv[0] = "lm_eval"; cli_evaluate()')
python3 - "$CKPT" "$TOKENIZER" <<'PY'
import sys, shutil, os, torch
from transformers import AutoTokenizer
from lp_plugin.tools.shapes import build_shape_model
ckpt, tok = sys.argv[1:]
if not os.path.exists(os.path.join(ckpt, "config.json")):
    m = build_shape_model("qwen2.5-3b-shape", "bf16", "cuda", seed=0)
    t = AutoTokenizer.from_pretrained(tok)
    m.config.vocab_size = m.config.vocab_size  # the shape's vocab (151936) covers the tokenizer's 49152 ids
    m.save_pretrained(ckpt)
    t.save_pretrained(ckpt)
    print("saved", ckpt)
PY
TASKS="$(python3 -m lp_plugin tasks-path)"
for dtype in ${DTYPES:-bf16 nf4}; do
  q=""; [ "$dtype" = nf4 ] && q=",load_in_4bit=True,bnb_4bit_quant_type=nf4,bnb_4bit_compute_dtype=bfloat16,bnb_4bit_use_double_quant=True"
  # stock `--model hf` cannot load 4-bit on transformers 5 (lm-eval 0.4.13 passes load_in_4bit=
  # straight to from_pretrained, which now refuses it): for NF4 the plain-model reference is
  # hf-residual-offload with offload=none (the same HFLM path with nothing offloaded)
  if [ "$dtype" = nf4 ]; then runs="plain:hf-residual-offload:offload=none offload:hf-residual-offload:offload=even"
  else runs="plain:hf: offload:hf-residual-offload:offload=even"; fi
  for run in $runs; do
    IFS=: read -r label model spec <<<"$run"
    extra=""; [ -n "$spec" ] && extra=",$spec,tier=${TIER:-cpu},mode=${MODE:-stream},alpha=1.0,prefetch=1"
    [ -n "$spec" ] && [ "${TIER:-cpu}" = disk ] && extra="$extra,offload_folder=/tmp/lp-off-$dtype"
    echo "=== $dtype $label ($model$extra)"
    "${LM_EVAL[@]}" --model "$model" --model_args "pretrained=$CKPT,dtype=bfloat16$q$extra" \
      --tasks lp_pydoc_ppl --include_path "$TASKS" --limit "$LIMIT" --device cuda:0 --batch_size 1 \
      --output_path "$OUTDIR/lm_eval-$dtype-$label" 2>&1 | grep -vE "Loading weights|it/s\]$" | tail -12
  done
done
