#!/usr/bin/env bash
# Every GPU check in one run, for a machine with a CUDA GPU (CI has none), sized for the run
# tool's H200: about 8 minutes in all, each section time-boxed, results printed as they come.
#
#   bash bench/gpu_carry.sh                  # once, where pip can download: .whl/ and .gpu/old/
#   bash bench/gpu_check.sh OUT_DIR [OLD_SRC_PARENT]   # on the GPU machine (default .gpu/old)
#
# It runs from the repository root without installing the project (PYTHONPATH=src) with the
# machine's own PyTorch, and installs the wheels in .whl/ (if any) to /tmp/site first. It needs
# torch, numpy, scipy, opencv (cv2), PyYAML, tqdm, scikit-image, Pillow and pytest, which the
# H200 image has (with diffusers' packaging, huggingface_hub, regex, requests, safetensors and
# open_clip's torchvision, timm), and trimesh and diffusers (plus open_clip_torch, ftfy and
# wcwidth for the old code), which it lacks and .whl/ brings. Its first section imports them
# all, prints their versions and lists what is missing; it stops at once where PyTorch sees no
# CUDA GPU. Sections:
#   1. the tests marked gpu;  2. one IdGen/ExpGen call at batch 100: eager, eager with the step
#   read back, CUDA graph, bfloat16, their capture time and max |diff| against the CPU
#   (bench/gpu_calls.py);  3. the pipeline at the original samplers and at dpmpp_2m 10: eager,
#   CUDA graphs, CUDA graphs + bfloat16 (bench/pipeline_speed.py);  4. test.py on the demo
#   models: CPU float32, CUDA float32 at batch 1, CUDA bfloat16 + graphs at batch 4, their
#   error tables and differences (bench/demo_runs.py);  5. batch sizes at FLAME size
#   (bench/batch_speed.py);  6. against 5bf4554 (eager, and today's CUDA graphs).
# Everything goes to OUT_DIR/gpu_check.log as it comes; the sections' figure files are packed
# into OUT_DIR/parts.tgz as each ends, and OUT_DIR/summary.txt (also printed) puts them against
# the targets (bench/gpu_summary.py).
# A failing or timed-out section does not stop the others. GPU_CHECK_SECONDS (default 540)
# bounds the whole run: a section starts only with time left and never runs past it.
# GPU_CHECK_ANYWAY=1 goes on without CUDA, so that the script can be checked on a CPU: every
# section then runs up to its first CUDA use and says so.
set -uo pipefail
out=$(realpath -m "${1:?usage: bash bench/gpu_check.sh OUT_DIR [OLD_SRC_PARENT]}")
cd "$(dirname "$0")/.."
old=$(realpath -m "${2:-.gpu/old}")
# OUT_DIR gets three files (the run tool returns at most 8): gpu_check.log, summary.txt and
# parts.tgz, the sections' figure files, packed again as each section ends
parts=$(mktemp -d /tmp/gpu_check_parts.XXXX)
export parts  # section 4 runs in a child shell
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
status=0
pack() { tar -czf "$out/parts.tgz" -C "$parts" . 2>/dev/null; }
section() { pack; echo; echo "== $* ($(date +%T), $((deadline - SECONDS)) s left)"; }
summary() { python3 bench/gpu_summary.py "$parts" && cp "$parts/summary.txt" "$out/"; pack; }
# timed LIMIT FILE CMD...: run CMD for at most LIMIT seconds (less if the run's time is nearly
# up), its output also written to OUT_DIR/FILE as it comes (FILE - for none)
timed() {
  local limit=$1 file=$2 left=$((deadline - SECONDS - 5)); shift 2
  ((left < limit)) && limit=$left
  if ((limit < 15)); then echo "!! skipped (no time left): $*"; status=1; return; fi
  [ "$file" = - ] && file=/dev/null || file=$parts/$file
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$file"
  local rc=${PIPESTATUS[0]}
  if ((rc == 124 || rc == 137)); then echo "!! timed out after ${limit} s: $*"; status=1
  elif ((rc != 0)); then echo "!! failed ($rc): $*"; status=1; fi
  return 0
}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "!! installing .whl/ failed"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

section "0. imports and machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1
python3 - "$parts" <<'EOF'
import importlib, json, sys
needed = {"torch": "everything", "numpy": "everything", "scipy": "FLAME, tests", "cv2": "test.py, tests",
          "yaml": "configs", "tqdm": "progress bars", "skimage": "tests, synthetic data", "PIL": "test.py",
          "pytest": "section 1", "trimesh": "tests/test_flame.py (carried)", "diffusers": "dpmpp_2m, unipc (carried)",
"open_clip": "old code 5bf4554 (carried)",
          "ftfy": "open_clip (carried)", "wcwidth": "ftfy (carried)", "torchvision": "open_clip", "timm": "open_clip"}
missing, versions = [], {}
for module, why in needed.items():
    try:
        versions[module] = getattr(importlib.import_module(module), "__version__", "?")
    except Exception as err:  # a broken install counts as missing
        missing.append(f"{module} ({why}): {type(err).__name__}: {err}")
print("found: " + ", ".join(f"{m} {v}" for m, v in versions.items()))
print("MISSING:\n  " + "\n  ".join(missing) if missing else "missing: nothing")
cuda = False
if "torch" in versions:
    import torch
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, CUDA available: {cuda}"
          + (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda else ""))
json.dump({"versions": versions, "missing": missing, "cuda": cuda}, open(f"{sys.argv[1]}/imports.json", "w"))
sys.exit(0 if cuda else 3)
EOF
if (($? != 0)) && [ -z "${GPU_CHECK_ANYWAY:-}" ]; then
  echo "!! PyTorch sees no CUDA GPU (or is missing): nothing else runs (GPU_CHECK_ANYWAY=1 goes on, to check the script)"
  summary
  exit 2
fi

section "1. tests marked gpu"
timed 120 gpu_tests.txt python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_denoiser.py \
  tests/test_pipeline.py tests/test_flame.py tests/test_noise.py

section "2. one denoiser call at batch 100 (bench/gpu_calls.py)"
timed 90 - python3 bench/gpu_calls.py --device cuda --json "$parts/calls.jsonl"

section "3. the pipeline on the GPU, batch 1 (bench/pipeline_speed.py, ArcFace + FaRL random weights)"
only=(--only "original: ddim_legacy + ddpm" "dpmpp_2m 10" --repeats 2 --json)
for variant in graph eager bf16; do
  case $variant in
    graph) flags=(--cuda-graph) ;; eager) flags=() ;; bf16) flags=(--cuda-graph --dtype bfloat16) ;;
  esac
  echo "-- $variant"
  timed 75 "pipe_$variant.txt" python3 bench/pipeline_speed.py --device cuda "${flags[@]}" "${only[@]}"
done

section "4. test.py on the demo models (CPU float32, CUDA float32, CUDA bfloat16 + graphs at batch 4)"
demo() {
  python3 -m ofer.data.synthetic --out data/synthetic --test-only >/dev/null || return 1
  local common=(--cfg configs/demo/test.yml --checkpoint1 models/demo/idrank.tar --checkpoint2 models/demo/idgen.tar
                --checkpoint3 models/demo/expgen.tar --filename data/synthetic/test/list.txt
                --imagepath data/synthetic/test --overwrite --log-level WARNING)
  python3 test.py "${common[@]}" --outputpath /tmp/demo_cpu --device cpu &&
  python3 test.py "${common[@]}" --outputpath /tmp/demo_cuda --device cuda &&
  python3 test.py "${common[@]}" --outputpath /tmp/demo_bf16 --device cuda --batch 4 --dtype bfloat16 \
    --opt test.cuda_graph=true &&
  python3 bench/demo_runs.py cpu_float32=/tmp/demo_cpu cuda_float32=/tmp/demo_cuda \
    cuda_bf16_graph_batch4=/tmp/demo_bf16 --json "$parts/demo.json" &&
  cp /tmp/demo_cuda/summary.json "$parts/demo_cuda_summary.json"
}
timed 150 - bash -c "$(declare -f demo); demo"

section "5. batch sizes at FLAME size, CUDA graphs (bench/batch_speed.py, tiny encoders)"
timed 60 - python3 bench/batch_speed.py --device cuda --cuda-graph --sizes flame --batches 1 8 32 auto \
  --json "$parts/batch.jsonl"
timed 60 - python3 bench/batch_speed.py --device cuda --cuda-graph --sizes flame --original --batches 1 8 32 auto \
  --repeats 1 --json "$parts/batch.jsonl"

section "6. against 5bf4554 at the original samplers ($old)"
if [ -d "$old/src/ofer" ]; then
  timed 120 compare_eager.txt python3 bench/pipeline_speed.py --device cuda --compare "$old" --repeats 1 --json
  timed 60 compare_graph.txt python3 bench/pipeline_speed.py --device cuda --cuda-graph --compare "$old" \
    --repeats 1 --json
else
  echo "!! no old code at $old (bash bench/gpu_carry.sh makes .gpu/old)"; status=1
fi

section "summary"
summary
echo "status $status"
exit $status
