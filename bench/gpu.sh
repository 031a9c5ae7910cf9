#!/usr/bin/env bash
# The GPU check in one command, from the repository root: `bash bench/gpu.sh` (about 7 minutes on one GPU).
# It installs nothing; it needs the packages of this checkout's environment (torch with CUDA, diffusers).
# Writes bench/RESULTS.md (its GPU section) and bench/gpu_results.json.
#   DMSTUDY_BENCH_DEVICE=cpu DMSTUDY_BENCH_TIMEOUT=3000 bash bench/gpu.sh --quick --budget 2400
#       the same code path, tiny, on the CPU (slow there: the budget and the timeout are raised)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"          # this checkout's dmstudy, whatever is installed
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/bench/.inductor-cache}"  # a rerun compiles from cache
exec timeout "${DMSTUDY_BENCH_TIMEOUT:-470}" python bench/gpu.py --device "${DMSTUDY_BENCH_DEVICE:-cuda}" "$@"
