#!/usr/bin/env bash
# What needs a GPU, in one call (for a session lent one; the device tool copies this tree there).
# Its image has torch, transformers and triton but no decord/gradio: only the GPU-relevant parts run.
# The default (issue 19, compiled decode), most important first; its time limits add up to 8.5 minutes (run it with
# timeout_s 560), and a step that fails ends in seconds, leaving time to fix and run again. With 4 minutes of device
# time left after it, run `bash scripts/gpu_check.sh decode-8k kernels-decode` at once (3.6 minutes of limits; the
# machine goes back after 30 s idle). Then, here: `python scripts/decode_targets.py <files_at> <files_at 2> --plots
# docs/results/decode_h200` (the plots stay behind: the device returns 8 files at most).
#   cuda-tests    compiled decode on CUDA: replayed CUDA-graph steps under torch.cuda.set_sync_debug_mode("error"),
#                 none recorded again, run eagerly or skipped; then the decode kernel against its reference natively
#                 (its 16-bit dots, which the interpreter cannot run, and the 1000-slot shape in fp32);
#   decode        Qwen2-VL-7B text dimensions, bf16, batch 1, 128K tokens: full / SnapKV / H2O / CAKE (both evicting
#                 every 16 steps) compiled, plain Hugging Face; the bound and bandwidth fraction per row (the
#                 targets; the two compiles, about a minute each, are paid here; H2O last, its prefill the slowest);
#   decode-batch  batch 8 at 32K tokens, full against SnapKV compiled: peak memory (does the batch fit);
#   then scripts/decode_targets.py prints each of the issue's targets against what was measured.
# The second call:
#   decode-8k     8K tokens: eager against compiled for the same four, and plain Hugging Face with its own compiled
#                 static cache (the peer row);
#   kernels-decode  the decode kernel alone against SDPA at 13K and 128K slots, bandwidth fraction.
# By name: kernel-tests | kernels | speed | prefill | quant | reuse (the earlier issues' GPU runs):
#   1. the Triton kernels against their references, natively (no interpreter);
#   2. the kernel benchmark at n = 4K..128K (H=28, Hk=4, d=128, bf16), bandwidth fraction per kernel;
#   3. the speed benchmark with Qwen2-VL-7B text dimensions, bf16, 8K..128K tokens;
#   4. (prefill) end to end at 128K tokens, 100 new tokens, vision budget 10%: prune_at and temporal merging
#      against plain Hugging Face;
#   5. (quant) KV quantization: its Triton decode-attention tests natively, then its benchmark at 7B dimensions,
#      32K tokens (quantized rows against the same policy at 16 bits; about 2 minutes);
#   6. (reuse) EPIC image reuse at 7B dimensions.
# Each step runs under its own time limit and a failure does not stop the next one; the benchmarks save their rows
# as they go, so a step stopped at its limit keeps what it measured. Results land in $OUT (or out/gpu by hand).
#   bash scripts/gpu_check.sh [cuda-tests|decode|decode-batch|decode-8k|kernels-decode|kernel-tests|kernels|...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(cuda-tests decode decode-batch)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
for step in "${steps[@]}"; do
  echo "== $step"
  case "$step" in
    kernel-tests) timeout 90 python3 -m pytest tests/test_kernels.py -q -x -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/kernel_tests.txt" ;;
    kernels) timeout 240 python3 -m vlcache.apps.bench.kernels --out "$OUT" 2>&1 | tee "$OUT/kernels.txt" ;;
    speed) timeout 400 python3 -m vlcache.apps.bench.speed --preset qwen2vl-7b --policies snapkv,h2o,vlcache,cake --new-tokens 32 --out "$OUT" 2>&1 | tee "$OUT/speed_gpu.txt" ;;
    prefill) timeout 420 python3 -m vlcache.apps.bench.speed --preset qwen2vl-7b --sizes 32768,131072 --vision-budget 0.1 \
        --new-tokens 100 --policies "vlcache,vlcache:prune_at=2,snapkv:prune_at=2,vlcache:prune_at=2;temporal_merge=0.9" \
        --out "$OUT/prefill" 2>&1 | tee "$OUT/prefill_gpu.txt"
      timeout 240 python3 -m vlcache.apps.bench.speed --preset qwen2vl-7b --sizes 131072 --vision-budget 0.1 --scene static \
        --new-tokens 100 --policies "full:temporal_merge=0.9,vlcache:prune_at=2;temporal_merge=0.9" \
        --out "$OUT/prefill_static" 2>&1 | tee "$OUT/prefill_static_gpu.txt" ;;
    quant) timeout 60 python3 -m pytest tests/test_quant_kernels.py -q -x -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/quant_tests.txt"
      timeout 90 python3 -m vlcache.apps.bench.quant --parts speed --preset qwen2vl-7b --sizes 32768 \
        --speed-rows "full,full:vision_bits=8;text_bits=8,full:vision_bits=4;text_bits=4,vlcache,vlcache:vision_bits=4;text_bits=8" \
        --out "$OUT" 2>&1 | tee "$OUT/quant_gpu.txt" ;;
    # one pytest, -v: a run stopped at its limit still names the tests that passed
    # the 16-bit kernel at the real head dim (T200-d128), an odd group (T130) and several splits (T1000); each
    # shape costs Triton compiles, and the fp32 masking cases run in the interpreter on every CPU run
    cuda-tests) timeout 90 python3 -m pytest tests/test_compiled_decode.py tests/test_kernels.py -v -p no:cacheprovider \
        -k "replayed_cuda or (decode_attention and (T1000 or (bf16 and (T200 or T130))))" 2>&1 | tee "$OUT/cuda_tests.txt" ;;
    kernels-decode) timeout 45 python3 -m vlcache.apps.bench.kernels --ops decode,decode-mass --sizes 13107,131072 \
        --out "$OUT/kernels_decode" 2>&1 | tee "$OUT/kernels_decode.txt" ;;
    # TORCH_LOGS=perf_hints: inductor says why, where it skips CUDA graphs (the rows' "graphs" column says whether)
    decode) TORCH_LOGS=perf_hints timeout 280 python3 -m vlcache.apps.bench.decode --preset qwen2vl-7b \
        --sizes 131072 --eager-sizes none --peer-sizes none --warmup none \
        --policies "snapkv,cake:evict_every=16,h2o:evict_every=16" --out "$OUT/decode" 2>&1 | tee "$OUT/decode_gpu.txt" ;;
    decode-batch) TORCH_LOGS=perf_hints timeout 140 python3 -m vlcache.apps.bench.decode --preset qwen2vl-7b \
        --batch 8 --sizes 32768 --eager-sizes none --peer-sizes none --warmup none --policies snapkv \
        --out "$OUT/decode_batch8" 2>&1 | tee "$OUT/decode_batch8_gpu.txt" ;;
    decode-8k) TORCH_LOGS=perf_hints timeout 170 python3 -m vlcache.apps.bench.decode --preset qwen2vl-7b \
        --sizes 8192 --warmup none --policies "snapkv,h2o:evict_every=16,cake:evict_every=16" \
        --out "$OUT/decode_8k" 2>&1 | tee "$OUT/decode_8k_gpu.txt" ;;
    reuse) timeout 300 python3 -m vlcache.apps.bench.reuse --device cuda --out "$OUT" 2>&1 | tee "$OUT/reuse_gpu.txt" ;;
    *) echo "unknown step $step" ;;
  esac
  # the device returns at most 8 files: the plots are drawn again here from the JSON (decode.png, kernels.png)
  case "$step" in decode*|kernels-decode) rm -f "$OUT"/decode*/decode.png "$OUT"/kernels_decode/kernels.png ;; esac
done
[ -n "$(ls "$OUT"/decode*/decode.json 2>/dev/null)" ] && python3 scripts/decode_targets.py "$OUT" 2>&1 | tee "$OUT/decode_targets.txt"
