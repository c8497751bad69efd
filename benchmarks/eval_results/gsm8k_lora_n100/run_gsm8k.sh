#!/bin/bash
# Issue 16: GSM8K LoRA evaluation at equal tokens (checkpointed; rerun the same command to resume).
cd /work/lora-run
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec nice -n 10 .venv/bin/python -m fishersft_ray.cli evaluate \
  --input ../shared/data/gsm8k_train_alpaca.json --output /work/lora-out/gsm8k_lora \
  --mode lora --train-device cpu --budgets 100,250 --seeds 3 \
  --methods tokenod_tokens,uniform,tokenod,length_matched \
  --max-pool 2400 --validation-size 200 --max-test 200 \
  --cache-dir /work/lora-out/cache --title "GSM8K, LoRA r=16 (SmolLM2-135M), pool 2400"
