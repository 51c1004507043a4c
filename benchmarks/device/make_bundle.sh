#!/usr/bin/env bash
# Builds .gpu/ (git-ignored through .git/info/exclude) for the device tool's GPU machine,
# which has PyTorch, timm and CUDA but no network and no Flower: what our runs need beyond
# its image, in at most 64 MiB with the checkout.
#   .gpu/ham10000.zip  the HAM10000 images and metadata (41 MB, stored, not compressed: one
#                    file travels in far fewer bytes than 10,016), unpacked there and read
#                    via FEDLSC_DATA_DIR
#   .gpu/whl/        Flower 1.42 and the few of its and our dependencies that image lacks
#                    (Python 3.12 wheels, installed there with --no-deps)
#   .gpu/lite0_imagenet_fp16.pt  EfficientNet-Lite0's ImageNet weights, mapped onto timm's
#                    tf_efficientnet_lite0, weights in float16 (BatchNorm statistics float32):
#                    the PyPI package holding them (17 MB) does not fit beside the images.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=.venv/bin/python
mkdir -p .gpu/whl
rm -rf .gpu/ham10000 .gpu/ham10000.zip
(cd ../shared/data/ham10000 && "$OLDPWD/$py" -c "
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_STORED) as archive:
    for folder, _, files in os.walk('.'):
        for name in sorted(files):
            archive.write(os.path.join(folder, name))
" "$OLDPWD/.gpu/ham10000.zip")
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/whl \
  flwr==1.42.0 protobuf==6.33.6 cryptography==50.0.2 pycryptodome==3.24.1 iterators==0.0.2 \
  tomli==2.5.0 tomli_w==1.2.0 hydra-core==1.3.8 omegaconf==2.3.1 grpcio-health-checking==1.81.1
# antlr4-python3-runtime 4.9.3 (Hydra's pin) exists only as an sdist: carry the pure-Python
# package as installed here.
site=$("$py" -c 'import antlr4, os; print(os.path.dirname(os.path.dirname(antlr4.__file__)))')
rm -rf .gpu/pylib && mkdir -p .gpu/pylib && cp -r "$site/antlr4" .gpu/pylib/
"$py" - <<'PY'
import torch
import timm
from fedlsc_flwr.model import _load_lite0_package_weights

net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, global_pool="")
_load_lite0_package_weights(net)
buffers = {name for name, _ in net.named_buffers()}
state = {k: (v.half() if k not in buffers and v.is_floating_point() else v)
         for k, v in net.state_dict().items()}
torch.save(state, ".gpu/lite0_imagenet_fp16.pt")
PY
du -sb .gpu/* && du -sb .gpu
