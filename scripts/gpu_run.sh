#!/usr/bin/env bash
# The one device call for a task lent a GPU (see scripts/gpu_check.py for what `prepare` writes here first).
# Carry: runs/gpu-check (the CPU logs) and .whl (this project's exact transformers/peft/gguf stack, since the
# GPU image's transformers is older). Each step writes its summary under $OUT as it finishes and has its own
# time limit, so one slow or failing step leaves the others' figures:
#   1. tests/test_device.py (CUDA-only properties) and one trainer test (device auto: CUDA), on the device
#   2. the CPU logs replayed on the device, and a device run replayed there (gpu_check.py check)
#   2b. the fused Triton kernels: kept by their self-check? the torch ops' bits on a 1.17 B model? how fast?
#   3. hyft bench rows on a random 1.17 B Llama in bf16, with the launch counts of a 7B step
#   4. scripts/gpu_profile.py on that model: launches, syncs and device time by op, per step
set -u
export PYTHONUNBUFFERED=1
timeout 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || echo "wheel install failed: running on the image's packages"
export PYTHONPATH=/tmp/site:src:.
{ nvidia-smi -L; python3 -c "import sys, torch, transformers, peft; print(sys.version.split()[0], torch.__version__,
  torch.version.cuda, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"; nproc; } \
  2>&1 | tee "$OUT/env.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider -n 4 tests/test_device.py \
  "tests/test_trainer.py::test_same_command_twice_gives_identical_metrics" 2>&1 | tail -40 > "$OUT/pytest.txt"
echo "pytest: $(tail -1 "$OUT/pytest.txt")"
timeout 90 python3 scripts/gpu_check.py check --in runs/gpu-check --device cuda --out /tmp/gc --bench-size none \
  > /tmp/gc.log 2>&1; echo "check rc=$?"; cp /tmp/gc/gpu_check.json "$OUT/" 2>/dev/null || tail -30 /tmp/gc.log
timeout 120 python3 scripts/gpu_fused.py --device cuda --out /tmp/gf > /tmp/gf.log 2>&1
echo "fused rc=$?"; cp /tmp/gf/gpu_fused.json "$OUT/" 2>/dev/null; tail -12 /tmp/gf.log
timeout 200 python3 scripts/gpu_check.py bench --out /tmp/gb --device cuda --size 1b > /tmp/gb.log 2>&1
echo "bench rc=$?"; cp /tmp/gb/bench/bench.json /tmp/gb/bench/bench.md /tmp/gb.log "$OUT/" 2>/dev/null; tail -40 /tmp/gb.log
# 4. where the step time goes (torch.profiler, unobserved rows): the question the first lease left open
timeout 80 python3 scripts/gpu_profile.py --model /tmp/gb/llama-1b-random-bf16 --device cuda --dtype bfloat16 \
  --rows mezo zo-full-in-place zo-full-stochastic zo-lowrank --out /tmp/prof > /tmp/prof.log 2>&1
echo "profile rc=$?"; cp /tmp/prof/profile.txt "$OUT/" 2>/dev/null; tail -5 /tmp/prof.log
