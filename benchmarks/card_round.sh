#!/usr/bin/env bash
# The H200 card round of benchmarks/results/h200-card.md: `make gpu-test`, then the emulated cards, results flat
# under $OUT. Run from the repo root on the GPU host with the offline site of ../shared/gpu/build_site.sh in
# .gpu/site and the bundled tokenizer in .gpu/tok (carried). CARDS picks a subset (default: all, in order).
export PYTHONPATH=$PWD/.gpu/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > $OUT/gpu.txt
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)" >> $OUT/gpu.txt
git log -1 --format=%H >> $OUT/gpu.txt 2>/dev/null
if [ -z "$NO_GPU_TEST" ]; then
  timeout 150 make gpu-test PY=python3 > $OUT/gpu-test.txt 2>&1; tail -3 $OUT/gpu-test.txt
fi
C="python3 benchmarks/card.py --tokenizer .gpu/tok --out $OUT --work-dir /tmp/card-work --ckpt-dir /dev/shm --rounds 5 --new-tokens 16 --step-timeout 240 --no-lm-eval-files"
N=0
card() { N=$((N+1)); case " ${CARDS:-all} " in *" all "*|*" $N "*) ;; *) return;; esac
  s=$(date +%s); $C "$@" > $OUT/card-$N.log 2>&1; echo "== $N: $* rc=$? $(( $(date +%s) - s ))s"
  tail -6 $OUT/card-$N.log | grep -vE "^\s*$"; for f in $OUT/card-*.json; do [ -f "$f" ] && mv "$f" "$OUT/$N-$(basename $f)"; done; }
card --card 3GiB --model qwen2.5-3b-shape --dtype nf4 --context 8192 --max-context 8192
card --card 4GiB --model qwen2.5-3b-shape --dtype bf16 --context 8192 --max-context 8192
card --card 6GiB --model llama-3-8b-shape --dtype bf16 --context 8192 --max-context 8192
card --card 4GiB --model llama-3-8b-shape --dtype nf4 --context 8192 --max-context 8192
card --card 3GiB --model qwen2.5-3b-shape --dtype nf4 --skip-reference --lm-eval --lm-eval-limit 8
card --card 6GiB --model qwen2.5-3b-shape --dtype bf16 --context 8192 --max-context 8192 --lm-eval --lm-eval-limit 16
