#!/usr/bin/env bash
# lp-bench's peers on the GPU host: lp_plugin streaming every layer from the disk tier (and, warm, from the cpu
# tier), loaded as users load it (lp_plugin.from_pretrained from the checkpoint), against AirLLM 4.0.0 (unpacked
# into .gpu/site) on the random-init Qwen2.5-3B shape in bf16, files in /dev/shm, results flat under $OUT (also
# after every round). COLD=1 adds the cold-cache pair (page cache dropped before every timed part and every decode
# step, judged against the storage read speed lp-bench measures there), COLD=only runs that pair alone (COLD_NEW
# decode steps, default 4). tmpfs keeps no other copy to drop to: the cold pair reads from PEERS_DIR (default
# /dev/shm/lp-peers warm, /var/tmp/lp-peers cold), which must be a disk. PEERS_REPEATS (default 5) sets the rounds.
export PYTHONPATH=$PWD/.gpu/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LP=stream:all:disk:protect_first=0:protect_last=0:load=pretrained
CONFIGS="$LP,stream:all:cpu:protect_first=0:protect_last=0:load=pretrained,airllm:new=1"
DIR=${PEERS_DIR:-/dev/shm/lp-peers}
if [ "$COLD" = only ]; then
  CONFIGS="$LP:cold:new=${COLD_NEW:-4},airllm:new=${COLD_NEW:-4}:cold"; DIR=${PEERS_DIR:-/var/tmp/lp-peers}
elif [ -n "$COLD" ]; then
  CONFIGS="$CONFIGS,$LP:cold,airllm:new=1:cold"; DIR=${PEERS_DIR:-/var/tmp/lp-peers}
fi
timeout ${PEERS_TIMEOUT:-330} python3 -m lp_plugin.tools.bench.cli --model qwen2.5-3b-shape --dtype bf16 \
  --tokenizer .gpu/tok --configs "$CONFIGS" --new 16 --repeats ${PEERS_REPEATS:-5} --static off --offload-dir $DIR \
  --no-progress --out $OUT/peers${COLD:+-cold}.json --plot $OUT/peers${COLD:+-cold}.png \
  > $OUT/peers${COLD:+-cold}.txt 2> $OUT/peers${COLD:+-cold}.err
echo "peers rc=$?"; tail -25 $OUT/peers${COLD:+-cold}.txt
