#!/usr/bin/env bash
# Wheels the GPU suite needs on a lent device machine that its image lacks (diffusers) or has at
# other versions (transformers, peft). They are pure Python; the machine cannot download, so they
# travel in .whl/ (git-ignored). Run once here, then through the device tool (carry: [".whl"]):
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 -m bench.gpu
#
# Without TensorFlow there, the VGG16 stage is reported under "Failures"; the rest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 peft==0.21.2 transformers==5.24.0
ls -la .whl
