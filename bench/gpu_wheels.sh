#!/usr/bin/env bash
# Wheels the GPU suite needs on a lent device machine that its image lacks (diffusers) or has at
# other versions (transformers, peft). They are pure Python; the machine cannot download, so they
# travel in .whl/ (git-ignored). Run once here, then through the device tool (carry: [".whl"]):
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 -m bench.gpu
#
# The image has no TensorFlow: the VGG16 stage runs the same gate on Keras' torch backend (keras and its
# two small dependencies travel too). regex travels because transformers checks its minimum version.
# pydantic (and its three dependencies) travels for the protocol models deskgen imports (client/).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 peft==0.21.2 transformers==5.24.0 keras==3.15.1 namex==0.1.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  regex==2026.11.19 optree==0.20.0 pydantic_core==2.50.5
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5
ls -la .whl
