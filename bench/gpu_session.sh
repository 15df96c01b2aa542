#!/bin/bash
# The GPU rows of docs/results, from a checkout on a lent GPU machine:
#   bench/gpu_session.sh classifier  -> deploy.md's GPU rows: bert_to_tiny's shapes (bench/serve_shapes.py),
#                                       teacher / student bf16, 2:4 and int8 GEMMs, NVML energy
#   bench/gpu_session.sh lm          -> oneshot.md acceptance 6 (distill.prune on the GPU), causal-lm.md
#                                       acceptance 8 (experiment=smollm2_to_small in bf16) and the decoder's
#                                       GPU serving rows
#   bench/gpu_session.sh fsdp        -> the same experiment under trainer=fsdp on the GPU (FSDP2 through
#                                       Lightning's ModelParallelStrategy; trainer=fsdp_cpu runs it on CPU)
# Needs DISTILL_LM_TEACHER (the GGUF), DISTILL_DATA_DIR and HF_HOME as the README says.
# Getting there (a lent machine of this workplace: no network, 64 MiB per call, warm for 30 s between
# calls): its image has torch, transformers, lightning and datasets' dependencies but not hydra-core,
# omegaconf, antlr4-python3-runtime, datasets, dill, multiprocess, gguf or torchao: carry them as
# wheels (pip download --no-deps --python-version 3.12 ...; antlr4 is an sdist: pip wheel it). The
# 94 MiB GGUF does not fit one call: split it (split -b 50000000), carry one part per call, move the
# first out of the checkout (mv to /tmp) and join them with cat; check its sha256. Every step's log
# and result lands in $WORK and is packed into $OUT/session.tgz after each step, so that a session cut
# short still returns what finished. A failed step does not stop the others.
set -u
OUT=${OUT:-/tmp/gpu_session}
WORK=${WORK:-/tmp/gpu_work}
mkdir -p "$OUT" "$WORK"
# bench/serve_shapes.py is run as a script: the checkout must be importable without an install.
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME COMMAND...: its log, its exit status and wall time in steps.txt, then pack
  local name=$1 started=$SECONDS
  shift
  "$@" >"$WORK/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - started))s" | tee -a "$WORK/steps.txt"
  pack
}

pack() {
  for result in /tmp/shapes/run/serve_bench.json /tmp/lm_run/metrics.json /tmp/lm_run/serve_bench.json; do
    [ -f "$result" ] && cp "$result" "$WORK/$(basename "$(dirname "$result")")_$(basename "$result")"
  done
  for run in /tmp/prune24/* /tmp/prune50/*; do
    [ -f "$run/prune.json" ] && cp "$run/prune.json" "$WORK/$(basename "$(dirname "$run")")_$(basename "$run").json"
  done
  tar czf "$OUT/session.tgz" -C "$WORK" .
}

classifier() {
  nvidia-smi --query-gpu=name,driver_version,power.draw,clocks.sm --format=csv >"$WORK/gpu.txt" 2>&1
  python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >>"$WORK/gpu.txt" 2>&1
  step shapes python3 bench/serve_shapes.py --out /tmp/shapes
  step serve_classifier python3 -m distill.serve_bench run_dir=/tmp/shapes/run task=classification teacher_path=/tmp/shapes/teacher \
    'threads=[1]' repeats=20 warmup=3 hydra.run.dir=/tmp/shapes/bench
}

lm() {
  local prune=(python3 -m distill.prune -m data.test_limit_blocks=32 calibration.samples=64)
  # The GGUF is de-quantized once into the cache; every job below reads it from there.
  step dequantize python3 -c "import os; from distill.utils.references import resolve; resolve(os.environ['DISTILL_LM_TEACHER'])"
  step prune_24 "${prune[@]}" method=magnitude,wanda,sparsegpt pattern=2:4 hydra.sweep.dir=/tmp/prune24
  # Training starts beside the unstructured runs: their times are marked as shared in steps.txt.
  step train_bf16 python3 -m distill.train experiment=smollm2_to_small trainer.precision=bf16-mixed logger=csv \
    trainer.enable_progress_bar=false hydra.run.dir=/tmp/lm_run &
  local train=$!
  step prune_50_beside_training "${prune[@]}" method=magnitude,wanda,sparsegpt sparsity=0.5 pattern=null \
    hydra.sweep.dir=/tmp/prune50
  wait "$train"
  step serve_lm python3 -m distill.serve_bench run_dir=/tmp/lm_run data=shakespeare \
    teacher_path="$DISTILL_LM_TEACHER" 'threads=[4]' repeats=10 warmup=2 hydra.run.dir=/tmp/lm_bench
}

fsdp() {
  step train_fsdp python3 -m distill.train experiment=smollm2_to_small trainer=fsdp logger=csv \
    trainer.enable_progress_bar=false hydra.run.dir=/tmp/lm_fsdp
  cp /tmp/lm_fsdp/metrics.json "$WORK/lm_fsdp_metrics.json" 2>/dev/null
  pack
}

"$@"
