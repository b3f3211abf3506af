#!/usr/bin/env bash
# Launch `alphastomics train` on one or many nodes with torchrun (one process per GPU).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/run_distributed.sh --data_dir DIR [options] [KEY=VALUE ...] [-- TRAIN_FLAGS ...]

Runs `alphastomics train` under torchrun with distributed.enabled=true, one process per GPU
(on a machine without GPUs: one CPU process each, gloo backend). Run the same command on every
node, changing only --node_rank.

Options:
  --data_dir DIR        processed store written by `alphastomics preprocess` (required)
  --output_dir DIR      run folder (default: outputs)
  --config FILE         YAML config (default: the packaged config.yaml)
  --nodes M             number of machines (default: 1)
  --gpus N              processes (GPUs) per machine (default: GPUs nvidia-smi lists, else 1)
  --node_rank R         this machine's index, 0 .. M-1 (default: 0)
  --master_addr HOST    address of node 0, reachable from every node (required when M > 1)
  --master_port PORT    free TCP port on node 0 (default: 29500)
  --strategy S          ddp | fsdp | deepspeed (default: the config's distributed.strategy)
  --dry_run             print the torchrun command and exit
  -h, --help            this text

KEY=VALUE arguments are config overrides (e.g. training.max_epochs=50); arguments after `--`
go to `alphastomics train` as they are (e.g. -- --resume).

Examples:
  # one machine, 4 GPUs
  scripts/run_distributed.sh --data_dir store --output_dir runs/a --gpus 4
  # two machines with 8 GPUs each: on node 0, then the same on node 1 with --node_rank 1
  scripts/run_distributed.sh --data_dir store --output_dir runs/b --nodes 2 --gpus 8 \
      --node_rank 0 --master_addr 10.0.0.1 --strategy fsdp training.max_epochs=100
EOF
}

die() {
  echo "run_distributed.sh: error: $*" >&2
  exit 2
}

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"
}

data_dir="" output_dir="outputs" config="" nodes=1 gpus="" node_rank=0
master_addr="" master_port=29500 strategy="" dry_run=0
overrides=() train_flags=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --data_dir) need_value "$@"; data_dir="$2"; shift 2 ;;
    --output_dir) need_value "$@"; output_dir="$2"; shift 2 ;;
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --nodes) need_value "$@"; nodes="$2"; shift 2 ;;
    --gpus) need_value "$@"; gpus="$2"; shift 2 ;;
    --node_rank) need_value "$@"; node_rank="$2"; shift 2 ;;
    --master_addr) need_value "$@"; master_addr="$2"; shift 2 ;;
    --master_port) need_value "$@"; master_port="$2"; shift 2 ;;
    --strategy) need_value "$@"; strategy="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; train_flags=("$@"); break ;;
    *=*) overrides+=("$1"); shift ;;
    *) die "unknown argument '$1' (options: --help; config overrides: KEY=VALUE; train flags after --)" ;;
  esac
done

[[ -n "$data_dir" ]] || die "--data_dir is required (a folder written by \`alphastomics preprocess\`)"
if [[ -z "$gpus" ]]; then
  gpus=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    found=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$found" -gt 0 ]] && gpus="$found"
  fi
fi
for pair in "nodes:$nodes" "gpus:$gpus" "master_port:$master_port"; do
  [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die "--${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
[[ "$node_rank" =~ ^[0-9]+$ && "$node_rank" -lt "$nodes" ]] ||
  die "--node_rank must be in 0..$((nodes - 1)), got '$node_rank'"
if [[ -z "$master_addr" ]]; then
  [[ "$nodes" -eq 1 ]] || die "--master_addr is required with --nodes $nodes (the address of node 0)"
  master_addr=127.0.0.1
fi
case "$strategy" in
  "" | ddp | fsdp | deepspeed) ;;
  *) die "--strategy must be ddp, fsdp or deepspeed, got '$strategy'" ;;
esac

if command -v torchrun >/dev/null 2>&1; then
  launcher=(torchrun)
else
  launcher=("${PYTHON:-python3}" -m torch.distributed.run)
fi
cmd=("${launcher[@]}" --nnodes "$nodes" --nproc_per_node "$gpus" --node_rank "$node_rank"
  --master_addr "$master_addr" --master_port "$master_port"
  -m alphastomics.main train --data_dir "$data_dir" --output_dir "$output_dir")
[[ -n "$config" ]] && cmd+=(--config "$config")
cmd+=(${train_flags[@]+"${train_flags[@]}"})
cmd+=(distributed.enabled=true "distributed.devices=$gpus" "distributed.num_nodes=$nodes")
[[ -n "$strategy" ]] && cmd+=("distributed.strategy=$strategy")
cmd+=(${overrides[@]+"${overrides[@]}"})

if [[ "$dry_run" -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
