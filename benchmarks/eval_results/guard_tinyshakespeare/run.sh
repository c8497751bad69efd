#!/bin/bash
# Issue 16: the near-duplicate guard on tinyshakespeare, plain and near-copy pools (head protocol).
# Run from anywhere: OUT (default out/guard) and CACHE (default out/guard-cache) are relative to the repo.
cd "$(dirname "$0")/../../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-out/guard} CACHE=${CACHE:-out/guard-cache}
common=(--input ../shared/data/tinyshakespeare.txt --validation-size 300 --max-pool 3000 --max-test 600
  --budgets 100,250 --seeds 3 --recipe-lrs 1e-4,3e-4,1e-3 --recipe-epochs 1 --near-dup-cosine 0.98
  --methods tokenod_tokens,tokenod_guard_tokens,uniform,density --features "$CACHE")
nice -n 15 .venv/bin/fishersft-ray evaluate "${common[@]}" --output "$OUT/plain" \
  --title "tinyshakespeare, head, plain pool, guard 0.98"
nice -n 15 .venv/bin/fishersft-ray evaluate "${common[@]}" --output "$OUT/nearcopy" \
  --redundant-share 0.5 --redundant-sources 60 --near-copy-noise 0.05 \
  --title "tinyshakespeare, head, near-copy pool, guard 0.98"
