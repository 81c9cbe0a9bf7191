#!/usr/bin/env bash
# Data-parallel scaling of hf-residual-offload under `accelerate launch` (stock lm-eval, random-init
# Qwen2.5-3B shape, stream mode, cpu tier, offload=even), in rounds: each round runs one process, two
# processes sharing one host copy of the offloaded layers, and two processes with one private copy
# each (LP_PLUGIN_SHARE_HOST_COPY=0); the summary gives per-round speedups (two processes' total
# tokens/s over one process's) with their median, min and max, and per-rank rates.
#   TOKENIZER=.gpu/tok OUT=dir ROUNDS=3 TASK=lp_pydoc_chunks bash benchmarks/dp_scaling.sh
# Needs lp_plugin installed as a wheel and the checkpoint multi_gpu.sh saves (CKPT).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:?output folder}"
CKPT="${CKPT:-/dev/shm/lp-qwen2.5-3b-shape}"
ROUNDS="${ROUNDS:-3}"
TASK="${TASK:-lp_pydoc_chunks}"
TASKS="$(python3 -m lp_plugin tasks-path)"
run() {  # name np share
  LP_PLUGIN_SHARE_HOST_COPY="$3" accelerate launch --num_processes "$2" --num_machines 1 --mixed_precision no \
    --dynamo_backend no -m lm_eval --model hf-residual-offload \
    --model_args "pretrained=$CKPT,dtype=bfloat16,offload=even,mode=stream,tier=cpu" --tasks "$TASK" \
    --include_path "$TASKS" --batch_size 1 --output_path "$OUT/$1" 2>&1 | grep -E "tok/s \(eval|Error" | head -5
}
for r in $(seq 0 "$ROUNDS"); do  # round 0 is a warm-up, discarded
  echo "=== round $r"
  run "r$r-np1" 1 1; run "r$r-np2-shared" 2 1; run "r$r-np2-private" 2 0
done
python3 - "$OUT" "$ROUNDS" "$TASK" <<'PY'
import glob, json, statistics, sys
out, rounds, task = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def info(d):
    f = sorted(glob.glob(f"{out}/{d}/**/results_*.json", recursive=True))[-1]
    r = json.load(open(f))
    return r["config"]["residual_offload"], r["results"][task]["word_perplexity,none"]
rows, ppl = [], set()
for r in range(1, rounds + 1):
    one, p1 = info(f"r{r}-np1")
    row = {"round": r, "np1_tok_s": one["tokens_per_second_eval"]}
    ppl.add(p1)
    for kind in ("shared", "private"):
        two, p2 = info(f"r{r}-np2-{kind}")
        ppl.add(p2)
        row[f"np2_{kind}_tok_s"] = two["totals"]["tokens_per_second"]
        row[f"speedup_{kind}"] = two["totals"]["tokens_per_second"] / one["tokens_per_second_eval"]
        row[f"rank_tok_s_{kind}"] = [x["tokens_processed"] / x["eval_seconds"] for x in two["ranks"]]
        row[f"host_bytes_per_host_{kind}"] = two["totals"]["host_tier_bytes_per_host"]
    rows.append(row)
def stats(key):
    v = [row[key] for row in rows]
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}
summary = {"task": task, "rounds": rows, "speedup_shared": stats("speedup_shared"),
           "speedup_private": stats("speedup_private"), "same_perplexity": len(ppl) == 1}
json.dump(summary, open(f"{out}/dp_scaling_summary.json", "w"), indent=1)
print(json.dumps({k: summary[k] for k in ("speedup_shared", "speedup_private", "same_perplexity")}))
PY
