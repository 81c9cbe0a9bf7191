#!/usr/bin/env bash
# Two GPUs of one host (issue: fit the user's Accelerate setup). Stock lm-eval, random-init Qwen2.5-3B
# shape with the bundled tokenizer, task lp_pydoc_ppl:
#   1. parallelize=True with max_memory_per_gpu (the model split across both GPUs by device_map="auto"):
#      --model hf against --model hf-residual-offload (offload=even), perplexity must be equal;
#   2. data parallel: accelerate launch --num_processes 1 and 2 of hf-residual-offload, tokens/s
#      from config.residual_offload.totals, host memory per rank and per host; on lp_pydoc_chunks
#      (109 documents of similar length) and lp_pydoc_ppl (70 topics of very different lengths:
#      lm-eval gives each rank an equal number of documents, not of tokens).
# Needs lp_plugin installed as a wheel (its .pth registers the model type for `-m lm_eval`):
#   WHEEL=.gpu/whl/lp_plugin-*.whl TOKENIZER=.gpu/tok OUT=dir bash benchmarks/multi_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:?output folder}"
CKPT="${CKPT:-/dev/shm/lp-qwen2.5-3b-shape}"
LIMIT_PAR="${LIMIT_PAR:-8}"
DP_TASKS="${DP_TASKS:-lp_pydoc_chunks lp_pydoc_ppl}"
python3 - "$CKPT" "${TOKENIZER:?}" <<'PY'
import sys, os
from transformers import AutoTokenizer
from lp_plugin.tools.shapes import build_shape_model
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
for task in $DP_TASKS; do
  for np in 1 2; do
    echo "=== data parallel, $task, $np process(es)"
    accelerate launch --num_processes "$np" --num_machines 1 --mixed_precision no --dynamo_backend no -m lm_eval \
      --model hf-residual-offload --model_args "pretrained=$CKPT,dtype=bfloat16,offload=even,mode=stream,tier=cpu" \
      --tasks "$task" --include_path "$TASKS" --batch_size 1 --output_path "$OUT/dp-$task-$np" 2>&1 \
      | grep -E "word_perplexity|layers|VRAM|tok/s|Error" | head -20
  done
done
python3 - "$OUT" $DP_TASKS <<'PY'
import json, sys, glob
out, dp_tasks = sys.argv[1], sys.argv[2:]
def load(d):
    f = sorted(glob.glob(f"{out}/{d}/**/results_*.json", recursive=True))[-1]
    return json.load(open(f))
summary = {}
runs = [("par-hf", "lp_pydoc_ppl"), ("par-hf-residual-offload", "lp_pydoc_ppl")]
runs += [(f"dp-{t}-{n}", t) for t in dp_tasks for n in (1, 2)]
for d, task in runs:
    try:
        r = load(d)
    except IndexError:
        summary[d] = "missing"; continue
    info = r["config"].get("residual_offload", {})
    summary[d] = {"word_perplexity": r["results"][task]["word_perplexity,none"], "documents": r["n-samples"][task]["effective"],
                  "totals": info.get("totals"), "tokens_per_second_eval": info.get("tokens_per_second_eval"),
                  "ranks": info.get("ranks"), "devices": info.get("engine", {}).get("devices"),
                  "offloaded_bytes": info.get("offloaded_bytes")}
p, q = summary.get("par-hf"), summary.get("par-hf-residual-offload")
if isinstance(p, dict) and isinstance(q, dict):
    summary["parallelize_exact"] = p["word_perplexity"] == q["word_perplexity"]
for t in dp_tasks:
    d1, d2 = summary.get(f"dp-{t}-1"), summary.get(f"dp-{t}-2")
    if isinstance(d1, dict) and isinstance(d2, dict) and d2.get("totals"):
        summary[f"dp_speedup_{t}"] = d2["totals"]["tokens_per_second"] / d1["tokens_per_second_eval"]
        summary[f"dp_same_perplexity_{t}"] = d1["word_perplexity"] == d2["word_perplexity"]
        summary[f"dp_rank_token_share_{t}"] = [r["tokens_processed"] / d2["totals"]["tokens_processed"] for r in d2["ranks"]]
json.dump(summary, open(f"{out}/multi_gpu_summary.json", "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k.startswith(("parallelize", "dp_"))}))
PY
