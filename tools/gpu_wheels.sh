#!/bin/sh
# The wheels the GPU machine lacks (its image has torch, torchvision and the rest; see docs/gpu.md), for
# Python 3.12 on x86-64, into .whl/ (ignored by git), for `make setup WHEELS=.whl` there (setuptools: yolozu's
# editable install without build isolation). Run here, where pip can download.
set -e
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pycocotools==2.0.11 mlxtend==0.25.0 setuptools
