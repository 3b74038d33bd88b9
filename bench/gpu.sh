#!/usr/bin/env bash
# The train and generate benches on one NVIDIA GPU, qwenvl_jax beside transformers on the same
# card, in a few minutes: the README's CPU shapes (bench/configs) in float32, the built-in
# Qwen3.5 models, and the share of the card's memory bandwidth that batch-1 decoding uses.
#
#   bash bench/gpu.sh            # from the repository root, in the environment of the README
#
# Needs a CUDA build of jax (installed here, matching the installed jax, when jax sees no GPU) and
# of torch (pip's default torch wheel on Linux is one). Results go to stdout and bench/gpu_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/gpu_out
mkdir -p "$out"

if ! command -v nvidia-smi > /dev/null; then
    echo "bench/gpu.sh: no nvidia-smi: this is not a machine with an NVIDIA GPU" >&2
    exit 2
fi
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card"

if ! python -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')" 2> /dev/null; then
    version=$(python -c "import jax; print(jax.__version__)")
    pip install -q "jax[cuda12]==$version"
fi
python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
    echo "bench/gpu.sh: torch sees no GPU (install a CUDA build of torch)" >&2
    exit 2
}

# memory bandwidth of the card in GB/s (vendor figures), for the share batch-1 decoding uses
case "$card" in
    *H200*) hbm=4800 ;;
    *H100*PCIe*) hbm=2000 ;;
    *H100*) hbm=3350 ;;
    *A100*80GB*) hbm=2039 ;;
    *A100*) hbm=1555 ;;
    *L40S*) hbm=864 ;;
    *L4*) hbm=300 ;;
    *A10*) hbm=600 ;;
    *) hbm=0 ;;
esac
hbm_args=()
if [ "$hbm" != 0 ]; then hbm_args=(--hbm-gbs "$hbm"); fi

python bench/train.py --config bench/configs/train_qwen2_5_vl.json \
    bench/configs/train_qwen3_vl_moe.json --seq 512 --steps 5 --warmup 2 | tee "$out/train.txt"
python bench/train.py --family qwen3_5 qwen3_5_moe --steps 5 --warmup 2 | tee "$out/train_qwen3_5.txt"
python bench/generate.py --config bench/configs/generate_qwen2_5_vl.json --batches 1 4 \
    --repeats 3 "${hbm_args[@]}" | tee "$out/generate.txt"
python bench/generate.py --family qwen3_5_moe --batches 1 4 --repeats 3 "${hbm_args[@]}" \
    | tee "$out/generate_qwen3_5_moe.txt"
echo "card: $card; the tables above are in $out/"
