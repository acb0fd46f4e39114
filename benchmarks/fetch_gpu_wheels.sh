#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on a lent GPU machine, into .whl/ at the repo root.
#
# The GPU machine (nvidia-h200 here; H100 before) has Python 3.12 and torch 2.11 (CUDA 13) with pytest,
# hypothesis, numpy, pyyaml, safetensors, tokenizers 0.23.2, huggingface_hub 1.33, psutil and tensorboard,
# but no megatron-core and an older transformers, and it cannot reach a package registry. So exactly two
# wheels travel (their other requirements are all in that image, checked with the Requires-Dist of each):
#
#   megatron-core==0.16.1   (cp312 manylinux; requires torch, numpy, packaging)
#   transformers==5.23.0    (pure Python; requires huggingface-hub>=1.31, tokenizers>=0.23.1,<0.24,
#                            safetensors>=0.8, numpy, packaging, pyyaml, regex, tqdm, typer)
#
# About 16 MB; the device tool carries at most 64 MiB of working tree per call. The folder is ignored by
# git (.git/info/exclude) so that it travels only when a run names it in `carry`:
#
#   bash benchmarks/fetch_gpu_wheels.sh
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
WHEELS=(megatron-core==0.16.1 transformers==5.23.0)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
mkdir -p .whl

# Python 3.12, CPython, x86-64 Linux: the device machine's interpreter, whatever this machine runs.
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"

# One version of each: two would stop the install there.
for name in megatron_core transformers; do
    count=$(find .whl -maxdepth 1 -name "${name}-*.whl" | wc -l)
    if [ "$count" -ne 1 ]; then
        echo "fetch_gpu_wheels: expected one ${name} wheel in .whl/, found ${count}" >&2
        exit 1
    fi
done
ls -l .whl
du -sh .whl
