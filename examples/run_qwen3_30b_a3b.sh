#!/usr/bin/env bash
# LUSPO on Qwen3-30B-A3B: 4 training nodes × 8 H100 (tp4 × ep8) + rollout nodes running SGLang.
# Run each section on the machine it names. Paths and host names are placeholders.
#
#   ROLLOUT NODES (each: 8 GPUs, one SGLang server with tp8/ep8):
#     python -m sglang.launch_server --model-path /models/Qwen3-30B-A3B --tp-size 8 --ep-size 8 \
#         --mem-fraction-static 0.7 --port 30001 --host 0.0.0.0 --skip-server-warmup \
#         [--enable-deterministic-inference] [--enable-return-routed-experts] [--api-key KEY]
#     The SGLang flags each trainer feature needs:
#       --enable-deterministic-inference   the same --seed draws the same samples: SGLang honours the
#                                          per-sample sampling_seed the trainer sends only in this mode
#       --enable-return-routed-experts     --use-rollout-routing-replay (R3): without it SGLang returns
#                                          no routed_experts and the run stops at step 1, naming the flag
#       --api-key KEY                      then give the trainer --sglang-api-key KEY (sent to every
#                                          server and the router as Authorization: Bearer)
#     Weight sync (--weight-sync): distributed (the examples' default) needs the servers to reach the
#     trainer nodes over NCCL; disk needs a directory the servers can read at the same path (the
#     trainer's <log-dir>/rollout_weights).
#   ROUTER NODE (sglang-router 0.3.2: `pip install '.[sglang]'`). It binds every interface by default,
#   its Prometheus exporter too: give both addresses explicitly.
#     python -m sglang_router.launch_router --host 0.0.0.0 --port 30000 \
#         --prometheus-host 127.0.0.1 --prometheus-port 29000 \
#         --worker-urls http://rollout-0:30001 http://rollout-1:30001
#     Workers may be added or removed later (POST /workers, DELETE /workers/{id}): the trainer re-reads
#     the router's list before every rollout and sync, and brings a new worker to the current weights
#     before it serves. With --use-rollout-routing-replay, do not use the router: 0.3.2 rebuilds each
#     /generate body and drops return_routed_experts; pass the servers with --sglang-url instead.
#   TRAINING NODES: this script, with NODE_RANK=0..3 and MASTER_ADDR set to node 0's address.
#
# One-time conversion (optional: --hf-checkpoint also loads HF weights directly, each rank reading
# its own slices; a converted checkpoint loads faster at this size):
#     torchrun --nproc-per-node 8 tools/convert_hf_to_megatron.py --hf-dir /models/Qwen3-30B-A3B \
#         --save /ckpt/qwen3-30b-a3b-base --target-tp 4 --target-ep 8
set -euo pipefail
cd "$(dirname "$0")/.."

: "${NODE_RANK:?set NODE_RANK (0..3)}"
: "${MASTER_ADDR:?set MASTER_ADDR (node 0)}"
MASTER_PORT=${MASTER_PORT:-29500}
ROUTER=${ROUTER:-http://router:30000}

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron's TP/SP communication overlap needs it

exec .venv/bin/torchrun --nnodes 4 --nproc-per-node 8 --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    tools/train_luspo.py --config examples/qwen3_30b_a3b_luspo.yaml \
    --tp 4 --ep 8 \
    --hf-checkpoint /models/Qwen3-30B-A3B \
    --load /ckpt/qwen3-30b-a3b-luspo --load-if-exists --save /ckpt/qwen3-30b-a3b-luspo \
    --rollout-engine sglang --sglang-router "$ROUTER" \
    "$@"
