#!/usr/bin/env bash
# Prepares, where pip can download, the two folders bench/gpu_check.sh needs on a GPU machine
# that has only a CUDA PyTorch and no package registry (the H200 the run tool lends):
#   .whl/      the wheels its image lacks (about 9 MB, all pure Python but wcwidth's, an abi3
#              manylinux one): trimesh (tests/test_flame.py, the evaluation), diffusers (the
#              dpmpp_2m and unipc samplers), open_clip_torch, ftfy, wcwidth (the FaRL tower of the
#              old code 5bf4554, for the comparison); versions as tested here
#   .gpu/old/  5bf4554's src/ (about 1 MB), the code the speed-up is measured against
# Both are listed in the repository's info/exclude, so they are never committed; the run tool
# carries them with `carry: [".whl", ".gpu"]` (64 MiB in all with the working tree).
#   bash bench/gpu_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=(trimesh==5.2.0 diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for path in /.whl/ /.gpu/; do grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >>"$exclude"; done
rm -rf .whl .gpu/old
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${wheels[@]}"
mkdir -p .gpu/old
git archive 5bf4554 src | tar -x -C .gpu/old
du -sh .whl .gpu
