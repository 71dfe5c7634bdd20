#!/usr/bin/env bash
# The GPU figures of docs/gpu.md, in one short run on a CUDA machine (ESM-2 650M architecture with
# random weights: an architecture costs the same whatever its weights; no download needed):
#   1. extraction of layer 24 in bf16: plmscope vs fair-esm's extract.py batching, as TFLOP/s and
#      % of the GPU's bf16 matmul rate measured in the same run;
#   2. an atlas build of 2,000 demo proteins with a 10,240-latent TopK SAE (time split by stage);
#   3. the server on that atlas: /api/infer p50 for a 300-residue sequence vs the bare forward
#      (with the forward's GPU kernel time against its wall time), micro-batching at 16 clients,
#      latent/protein JSON latency;
#   0. first, scripts/gpu_checks.py: the CUDA paths against fair-esm and the CPU (a failed check
#      makes the script exit 1 at the end; the timings still run).
# Usage: bash scripts/bench_gpu.sh [OUTDIR]
#   (writes gpu.txt, checks.txt, representations.txt, server.json, server.log)
set -euo pipefail
out=$(realpath -m "${1:-gpu-out}")
mkdir -p "$out"
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$out/gpu.txt"
SECONDS=0
checks=0
PYTHONUNBUFFERED=1 python3 gpu_checks.py --arch esm2_t33_650M_UR50D --n 8 --max-len 500 2>&1 | tee "$out/checks.txt" || checks=$?
echo "checks took ${SECONDS} s (status $checks)"
PYTHONUNBUFFERED=1 python3 bench_representations.py --device cuda --arch esm2_t33_650M_UR50D --dtype bf16 \
  --layer 24 --n 2000 --max-len 1022 --token-budget 32768 --baselines extract --repeats 2 --peak-tflops 989 \
  2>&1 | tee "$out/representations.txt"
echo "extraction done at ${SECONDS} s"
PYTHONUNBUFFERED=1 python3 bench_server.py --device cuda --arch esm2_t33_650M_UR50D --layer 24 --latents 10240 \
  --k 64 --proteins 2000 --queries 200 --infer-runs 30 --length 300 --workdir /tmp/plmscope_bench_gpu \
  > "$out/server.json" 2> "$out/server.log"
echo "server done at ${SECONDS} s"
tail -n 5 "$out/server.log"
cat "$out/server.json"
exit "$checks"
