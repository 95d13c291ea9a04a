#!/usr/bin/env bash
# Launch any training script of this repo on several processes with torchrun (DDP: gloo on CPU, nccl on GPU).
#
#   bash train_ddp.sh SCRIPT [NPROC] [script flags...]
#
# One node, 8 GPUs:
#   bash train_ddp.sh grpo.py 8 --model DIR --data gsm8k.jsonl
# Two CPU processes (what CI tests):
#   bash train_ddp.sh sft.py 2 --device cpu --max_steps 5
# Several nodes: run the same command on every node, with the node's rank and one rendezvous address:
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash train_ddp.sh grpo.py 8 ...
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash train_ddp.sh grpo.py 8 ...
# --batch_size is global (all processes of all nodes together) and must be divisible by their number.
set -euo pipefail
if [ $# -lt 1 ]; then
    sed -n '2,15p' "$0"
    exit 2
fi
script=$1
shift
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
    nproc=$1
    shift
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nproc=$(nvidia-smi -L | wc -l)
else
    nproc=1
fi
exec torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$nproc" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" "$script" "$@"
