#!/usr/bin/env bash
# Is the study's score stage slow because parallel units oversubscribe the CPU? (benchmarks/STUDY.md)
# Times `ssreg-eval generation` (2000 samples against 2000 references, EfficientNet-Lite0 features) on synthetic
# 128 px images: once alone, then N copies at once with torch's default threads, then N copies with cores/N threads.
# usage: N=4 bash benchmarks/score_contention.sh   (needs diffusers_ssreg importable and the GPU for --device cuda)
set -u
N=${N:-4}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/score_contention}
PY=${PY:-python3}
mkdir -p "$WORK"
"$PY" - "$WORK" <<'PYEOF'
import os, sys
import numpy as np
from PIL import Image
root = sys.argv[1]
rng = np.random.default_rng(0)
base = rng.integers(0, 255, (16, 16, 3)).astype(np.float32)
for kind in ("samples", "reference"):
    os.makedirs(os.path.join(root, kind), exist_ok=True)
    for i in range(2000):  # smooth random images (upsampled noise), not white noise
        small = np.clip(base + rng.normal(0, 60, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(small).resize((128, 128), Image.BICUBIC).save(os.path.join(root, kind, f"{i:05d}.png"))
PYEOF
score() {  # $1: output folder
    "$PY" -m diffusers_ssreg.evaluation.cli generation --samples "$WORK/samples" --reference "$WORK/reference" \
        --resolution 0 --max_samples 2000 --feature_extractor effnet-lite0 --no_download --batch_size 250 \
        --device "$DEVICE" --no_progress --num_workers 2 --output_dir "$1" > "$1.log" 2>&1
}
run() {  # $1: label, $2: copies, $3: OMP_NUM_THREADS ("" = torch's default)
    local start=$(date +%s%N)
    for k in $(seq "$2"); do
        if [ -n "$3" ]; then OMP_NUM_THREADS=$3 MKL_NUM_THREADS=$3 score "$WORK/$1_$k" & else score "$WORK/$1_$k" & fi
    done
    wait
    local ms=$(( ($(date +%s%N) - start) / 1000000 ))
    echo "$1: $2 at once, OMP_NUM_THREADS=${3:-default}: $(( ms / 1000 )).$(( ms % 1000 / 100 )) s"
}
echo "cores: $(nproc)"
run alone 1 ""
run shared_default "$N" ""
run shared_split "$N" "$(( $(nproc) / N ))"
