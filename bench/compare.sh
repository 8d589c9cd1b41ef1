#!/usr/bin/env bash
# Runs `gradcam bench classify` and pytorch-grad-cam's timing on EfficientNet-Lite0 back to back,
# with the same thread count, and prints both medians and the ratios.
#   PYTHON=/tmp/venv/bin/python bench/compare.sh [threads] [iters]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
iters=${2:-20}
python=${PYTHON:-python3}
cargo build --release -q -p gradcam-cli
ours=$(./target/release/gradcam --threads "$threads" bench classify --iters "$iters" --json)
theirs=$("$python" bench/pytorch_gradcam.py --threads "$threads" --iters "$iters")
"$python" - "$ours" "$theirs" <<'PY'
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"EfficientNet-Lite0, 224x224, batch 1, {o['threads']} threads, median of {o['iters']} runs")
print(f"  gradcam (Rust)     forward {o['forward_ms']:7.2f} ms   Grad-CAM {o['gradcam_ms']:7.2f} ms   ratio {o['gradcam_ms']/o['forward_ms']:.3f}")
print(f"  PyTorch {t['torch']:<10} forward {t['forward_ms']:7.2f} ms   pytorch-grad-cam {t['gradcam_ms']:7.2f} ms")
print(f"  pytorch-grad-cam / gradcam: {t['gradcam_ms']/o['gradcam_ms']:.2f}x   (our Grad-CAM / PyTorch forward: {o['gradcam_ms']/t['forward_ms']:.2f}x)")
PY
