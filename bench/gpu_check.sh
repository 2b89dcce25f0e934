#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU (CI has none): the `gpu` tests,
# the pipeline's speed on the GPU (eager, CUDA graphs, bfloat16; against commit 5bf4554 too),
# what the eager path's per-call read-back of the step costs, and test.py on the demo models.
# Sized to take about 5 minutes on one H200 (an estimate: no GPU has run it yet); every
# section's output goes to OUT_DIR/gpu_check.log, and a failing section does not stop the others.
#
#   bash bench/gpu_check.sh OUT_DIR [OLD_CHECKOUT]
#
# It runs from the repository root without installing the project (PYTHONPATH=src), with the
# machine's own PyTorch. Packages the machine lacks can wait as wheels in .whl/ (installed to
# /tmp/site first), made where pip can download (pure-Python wheels; PyTorch, numpy, scipy,
# OpenCV, PyYAML, tqdm, scikit-image, Pillow, pytest and diffusers' huggingface_hub, requests and
# filelock are assumed there):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl trimesh diffusers
# OLD_CHECKOUT holds 5bf4554's src/ for the comparison (skipped without it), e.g.
#   mkdir -p .gpu/old && git archive 5bf4554 src | tar -x -C .gpu/old
# Neither folder is tracked: list /.whl/ and /.gpu/ in .git/info/exclude and have them carried.
set -uo pipefail
out=$(realpath -m "${1:?usage: bash bench/gpu_check.sh OUT_DIR [OLD_CHECKOUT]}")
old=${2:+$(realpath -m "$2")}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
section() { echo; echo "== $* ($(date +%T))"; }
run() { "$@" || { echo "!! failed ($?): $*"; status=1; }; }

section "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

section "gpu tests"
run python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_denoiser.py tests/test_pipeline.py tests/test_flame.py

section "pipeline at the original samplers: eager, CUDA graphs, CUDA graphs + bfloat16"
only=(--only "original: ddim_legacy + ddpm" --repeats 2)
run python3 bench/pipeline_speed.py --device cuda "${only[@]}"
run python3 bench/pipeline_speed.py --device cuda --cuda-graph "${only[@]}"
run python3 bench/pipeline_speed.py --device cuda --cuda-graph --dtype bfloat16 "${only[@]}"
run python3 bench/pipeline_speed.py --device cuda --cuda-graph --images 8 "${only[@]}"

section "all settings with CUDA graphs"
run python3 bench/pipeline_speed.py --device cuda --cuda-graph --repeats 2

if [ -n "$old" ]; then
  section "against $old (eager, then CUDA graphs for today's code; the old code has none)"
  run python3 bench/pipeline_speed.py --device cuda --compare "$old" --repeats 2
  run python3 bench/pipeline_speed.py --device cuda --cuda-graph --compare "$old" --repeats 2
fi

section "eager path: the step read back per call (a host sync) against none"
run python3 - <<'EOF'
import time
import torch
from ofer.diffusion import Denoiser

cuda = torch.device("cuda")
for name, (d, c, dims) in {"IdGen": (300, 512, [300, 50, 10]), "ExpGen": (53, 1024, [53, 25, 10])}.items():
    torch.manual_seed(0)
    net = Denoiser(d, c, dims).eval().to(cuda)
    x, t = torch.randn(100, d, device=cuda), torch.full((100,), 500, device=cuda)
    fast = net.sampler(torch.randn(100, c, device=cuda), timesteps=[500])
    step, time_part = t[:1], fast.time_parts[500]
    calls = {"__call__ (reads the step back)": lambda x: fast(x, t),
             "eps (no read-back)": lambda x: fast.eps(x, step, time_part)}
    for label, call in calls.items():
        best = float("inf")
        for _ in range(3):
            y = x
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(200):  # a chain, as in sampling: each call takes the last one's output
                y = y - 1e-3 * call(y)
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - start) / 200)
        print(f"{name} {label}: {1000 * best:.3f} ms per call")
EOF

section "test.py on the demo models, on the GPU"
run python3 demo.py
run python3 test.py --cfg configs/demo/test.yml --checkpoint1 models/demo/idrank.tar \
  --checkpoint2 models/demo/idgen.tar --checkpoint3 models/demo/expgen.tar \
  --filename data/synthetic/test/list.txt --imagepath data/synthetic/test \
  --outputpath "$out/demo_cuda" --device cuda --overwrite
cp "$out/demo_cuda/summary.json" "$out/demo_cuda_summary.json" 2>/dev/null
rm -rf "$out/demo_cuda"

section "done, status $status"
exit $status
