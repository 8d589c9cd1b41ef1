#!/usr/bin/env bash
# Runs `gradcam eval` for the three kinds of model and writes the results tables into
# docs/results.md (the page docs/evaluations.md links to; the only place those figures appear).
# Never edit those numbers by hand; run this script.
#   scripts/results.sh [limit]   (ShapeScenes images per model; default 500)
# Per-image results and failure pages land in target/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=${1:-500}
cargo build --release -q -p gradcam-cli
bin=./target/release/gradcam
out=target/results
data=data/shapescenes-10k
if [ ! -d "$data/test" ]; then
    "$bin" scenes --out "$data" --n 10000 --seed 0
fi
commit=$(git rev-parse --short HEAD)
if ! git diff --quiet HEAD -- crates models data Cargo.toml Cargo.lock; then
    commit="$commit with uncommitted changes"
fi
date=$(date -u +%Y-%m-%d)

runs=(
    "efficientnet-lite0|$bin eval all --model efficientnet-lite0 --data data/photos --out $out/efficientnet-lite0 --failures 5"
    "captioner|$bin eval all --model models/captioner --data $data/test --limit $limit --tolerance 0.0625 --out $out/captioner --failures 20"
    "vqa|$bin eval all --model models/vqa --data $data/test --limit $limit --tolerance 0.0625 --out $out/vqa --failures 20"
    "adversarial|$bin eval adversarial --model efficientnet-lite0 --data data/photos --out $out/adversarial --failures 6"
    "adversarial-targeted|$bin eval adversarial --model efficientnet-lite0 --data data/photos --target random --out $out/adversarial-targeted --failures 6"
)
{
    echo "# Evaluation results"
    echo
    echo "Written by \`scripts/results.sh\`, never by hand. What each row measures: [evaluations.md](evaluations.md)."
    echo
    echo "Produced by \`scripts/results.sh $limit\` at commit $commit on $date (Grad-CAM, 2-core machine)."
    for run in "${runs[@]}"; do
        name=${run%%|*}
        cmd=${run#*|}
        echo "running: $cmd" >&2
        start=$(date +%s)
        $cmd >/dev/null
        took=$(( $(date +%s) - start ))
        echo
        echo "\`${cmd#./target/release/}\` (${took} s):"
        echo
        cat "$out/$name/summary.md"
    done
} > docs/results.md.tmp
mv docs/results.md.tmp docs/results.md

echo "wrote docs/results.md" >&2
