#!/usr/bin/env bash
# Two GPUs of one host (issue: fit the user's Accelerate setup). Stock lm-eval, random-init Qwen2.5-3B
# shape with the bundled tokenizer, task lp_pydoc_ppl:
#   1. parallelize=True with max_memory_per_gpu (the model split across both GPUs by device_map="auto"):
#      --model hf against --model hf-residual-offload (offload=even), perplexity must be equal;
#   2. data parallel: accelerate launch --num_processes 1 and 2 of hf-residual-offload, tokens/s
#      from config.residual_offload.totals, host memory held per rank.
# Needs lp_plugin installed as a wheel (its .pth registers the model type for `-m lm_eval`):
#   WHEEL=.gpu/whl/lp_plugin-*.whl TOKENIZER=.gpu/tok OUT=dir bash benchmarks/multi_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:?output folder}"
CKPT="${CKPT:-/dev/shm/lp-qwen2.5-3b-shape}"
LIMIT_PAR="${LIMIT_PAR:-8}"
LIMIT_DP="${LIMIT_DP:-96}"
python3 - "$CKPT" "${TOKENIZER:?}" <<'PY'
import sys, os
from transformers import AutoTokenizer
from lp_plugin.shapes import build_shape_model
ckpt, tok = sys.argv[1:]
if not os.path.exists(os.path.join(ckpt, "config.json")):
    build_shape_model("qwen2.5-3b-shape", "bf16", "cuda:0", seed=0).save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(tok).save_pretrained(ckpt)
PY
TASKS="$(python3 -m lp_plugin tasks-path)"
common=(--tasks lp_pydoc_ppl --include_path "$TASKS" --batch_size 1)
for run in "hf:" "hf-residual-offload:,offload=even,mode=stream,tier=cpu"; do
  IFS=: read -r model extra <<<"$run"
  echo "=== parallelize $model"
  python3 -m lm_eval --model "$model" --model_args "pretrained=$CKPT,dtype=bfloat16,parallelize=True,max_memory_per_gpu=4GiB$extra" \
    "${common[@]}" --limit "$LIMIT_PAR" --output_path "$OUT/par-$model" 2>&1 | grep -E "word_perplexity|hf-residual|layers|VRAM|tok/s|Error" | head -20
done
for np in 1 2; do
  echo "=== data parallel, $np process(es)"
  accelerate launch --num_processes "$np" --num_machines 1 --mixed_precision no --dynamo_backend no -m lm_eval \
    --model hf-residual-offload --model_args "pretrained=$CKPT,dtype=bfloat16,offload=even,mode=stream,tier=cpu" \
    "${common[@]}" --limit "$LIMIT_DP" --output_path "$OUT/dp-$np" 2>&1 | grep -E "word_perplexity|layers|VRAM|tok/s|Error" | head -20
done
python3 - "$OUT" <<'PY'
import json, sys, glob
out = sys.argv[1]
def load(d):
    f = sorted(glob.glob(f"{out}/{d}/**/results_*.json", recursive=True))[-1]
    return json.load(open(f))
summary = {}
for d in ("par-hf", "par-hf-residual-offload", "dp-1", "dp-2"):
    try:
        r = load(d)
    except IndexError:
        summary[d] = "missing"; continue
    info = r["config"].get("residual_offload", {})
    summary[d] = {"word_perplexity": r["results"]["lp_pydoc_ppl"]["word_perplexity,none"],
                  "totals": info.get("totals"), "tokens_per_second_eval": info.get("tokens_per_second_eval"),
                  "ranks": info.get("ranks"), "devices": info.get("engine", {}).get("devices")}
p, q = summary.get("par-hf"), summary.get("par-hf-residual-offload")
if isinstance(p, dict) and isinstance(q, dict):
    summary["parallelize_exact"] = p["word_perplexity"] == q["word_perplexity"]
d1, d2 = summary.get("dp-1"), summary.get("dp-2")
if isinstance(d1, dict) and isinstance(d2, dict) and d2.get("totals"):
    summary["dp_speedup"] = d2["totals"]["tokens_per_second"] / d1["tokens_per_second_eval"]
    summary["dp_same_perplexity"] = d1["word_perplexity"] == d2["word_perplexity"]
json.dump(summary, open(f"{out}/multi_gpu_summary.json", "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k in ("parallelize_exact", "dp_speedup", "dp_same_perplexity")}))
PY
