#!/usr/bin/env bash
# Every GPU figure of the kit, side by side, on one GPU in about 8 minutes; installs nothing.
#
#   bash bench/gpu_bench.sh          # on a GPU node, in the kit's environment
#   bash bench/gpu_bench.sh --cpu    # the same steps at CPU sizes (tried here without a GPU)
#
# Steps, each under its own timeout (a step that runs out prints TIMEOUT and the rest go on):
#   train   bench/bench_train.py: the trainer's step vs a plain loop, MFU (0.5b and 7b_slice)
#   decode  bench/bench_decode.py: eager vs compiled, plain vs speculative vs transformers
#   loss    bench/bench_gpu_loss.py: the kit's loss vs Liger-Kernel and the naive step
#   smoke   tests/gpu_smoke.py: both stages, crash, deterministic bit-exact resume, generation
# Each step's full output is kept in $OUT (default: a temp dir, printed); the table at the end
# has one line per step: its status, seconds and the lines that carry its figures.
set -uo pipefail
cd "$(dirname "$0")/.."
cpu=""
[ "${1:-}" = "--cpu" ] && cpu=1
OUT=${OUT:-$(mktemp -d -t wmtp-gpu-bench-XXXXXX)}
mkdir -p "$OUT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0}  # one GPU
[ -n "$cpu" ] && export CUDA_VISIBLE_DEVICES=""

if [ -n "$cpu" ]; then
    steps=(
        "train|120|python bench/bench_train.py --shape tiny --rounds 3 --warmup 1 --algos baseline rho1-weighted"
        "decode|300|python bench/bench_decode.py --device cpu --dim 64 --layers 6 --vocab 512 --new-tokens 16 --rounds 1"
        "loss|120|python bench/bench_gpu_loss.py --cpu --shapes tiny"
        "smoke|600|python tests/gpu_smoke.py --cpu"
    )
else
    steps=(
        "train|130|python bench/bench_train.py --shape 0.5b --rounds 8 && python bench/bench_train.py --shape 7b_slice --rounds 5 --algos baseline rho1-weighted"
        "decode|120|python bench/bench_decode.py"
        "loss|80|python bench/bench_gpu_loss.py"
        "smoke|150|python tests/gpu_smoke.py"
    )
fi

python - <<'EOF'
import torch, transformers, accelerate
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
print(f"device {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, accelerate {accelerate.__version__}")
EOF
summary=()
for entry in "${steps[@]}"; do
    IFS="|" read -r name limit cmd <<<"$entry"
    log="$OUT/$name.log"
    start=$SECONDS
    timeout --kill-after=10 "$limit" bash -c "$cmd" >"$log" 2>&1
    rc=$?
    secs=$((SECONDS - start))
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAIL($rc)" ;;
    esac
    echo "== $name: $status in ${secs}s (limit ${limit}s): $cmd"
    cat "$log"
    summary+=("$(printf '%-7s %-11s %5ss  %s' "$name" "$status" "$secs" "$(grep -E 'ratio|x plain|kit/|SUMMARY|ms/token|MFU|Liger|speculative' "$log" | tail -3 | tr '\n' ' ' | cut -c1-160)")")
done
echo
echo "step    status      time   figures (full logs in $OUT)"
printf '%s\n' "${summary[@]}"
