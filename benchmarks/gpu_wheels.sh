#!/usr/bin/env bash
# Wheels the GPU machine lacks, for benchmarks/gpu_check.sh: its image has torch, transformers 5.17 and most
# scientific packages, but not transformer-lens (nor datasets, dill, multiprocess, beartype, fancy-einsum,
# typeguard, which TransformerLens imports); transformers 5.23 is the version the KV-reusing fast path is checked on.
# Run here (package registry reachable), in the checkout the device tool sends, then carry `.whl`:
#   echo /.whl/ >> .git/info/exclude && bash benchmarks/gpu_wheels.sh      (~17 MB)
#   device run: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 540
set -eu
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
    transformer-lens==4.3.0 transformers==5.23.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    beartype==0.23.1 fancy-einsum==0.0.3 typeguard==4.6.1
du -sh "$DEST"
