#!/usr/bin/env bash
# Times every CAM method in gradcam and in pytorch-grad-cam on EfficientNet-Lite0, same weights,
# input and threads, one after the other, and prints both with the ratio per method.
#   PYTHON=/tmp/venv/bin/python bench/compare_methods.sh [threads] [iters] [methods] [input.safetensors]
# (input: a preprocessed [1, 3, 224, 224] tensor `input`, e.g. tests/fixtures/input.safetensors, a
# photo; default: a synthetic pattern)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
iters=${2:-10}
methods=${3:-gradcam,gradcam++,hirescam,xgradcam,layercam,eigencam,ablationcam,scorecam,guided-backprop,guided-gradcam}
input=${4:-}
python=${PYTHON:-python3}
cargo build --release -q -p gradcam-cli
ours=$(./target/release/gradcam --threads "$threads" bench methods --iters "$iters" --methods "$methods" ${input:+--input "$input"} --json)
theirs=$("$python" bench/pytorch_methods.py --threads "$threads" --iters "$iters" --methods "$methods" ${input:+--input "$input"})
"$python" - "$ours" "$theirs" "$input" <<'PY'
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"EfficientNet-Lite0, 224x224, batch 1, {o['threads']} threads; median of {o['iters']} runs (ablationcam, scorecam: one); input: {sys.argv[3] or 'synthetic pattern'}")
print(f"  {'method':<16} {'gradcam (Rust)':>15} {'pytorch-grad-cam':>17} {'speed-up':>9}")
for name, ms in o["methods"]:
    theirs = t["methods"][name]
    print(f"  {name:<16} {ms:>12.1f} ms {theirs:>14.1f} ms {theirs / ms:>8.1f}x")
PY
