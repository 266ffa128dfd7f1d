#!/usr/bin/env bash
# What the H200 device machine lacks, packed into .gpu/ (git-ignored) to travel with a `run` call:
# FlashInfer as an xz tarball of the installed package (the 101-MB wheel installs to ~850 MB, mostly
# CUDA sources for its JIT; xz brings it near 26 MB, under the 64-MiB a call carries) and the cp312
# wheels of apache-tvm-ffi (FlashInfer's JIT runtime) and msgspec (ours). Everything else dopd needs
# is in that machine's image (device/KINDS.md), and `import flashinfer` needs none of its other
# declared requirements (cuda-tile, cutlass-dsl, cudnn-frontend: they serve kernels we do not call).
#
#   scripts/gpu_bundle.sh            # here, once (a minute or two)
#   then, through the device tool, with carry [".gpu"]:
#   mkdir -p /tmp/site && tar -C /tmp/site -xJf .gpu/flashinfer.tar.xz \
#     && python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl \
#     && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --json $OUT/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
FLASHINFER_VERSION=0.7.4
rm -rf .gpu && mkdir -p .gpu
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$stage/wheels" "flashinfer-python==$FLASHINFER_VERSION" "apache-tvm-ffi>=0.1.11,<0.2" msgspec
mv "$stage"/wheels/apache_tvm_ffi-*.whl "$stage"/wheels/msgspec-*.whl .gpu/
python3 -m pip install -q --no-deps --no-compile --target "$stage/site" "$stage"/wheels/flashinfer_python-*.whl
XZ_OPT=-9T0 tar -C "$stage/site" -cJf .gpu/flashinfer.tar.xz flashinfer
du -sh .gpu/*
