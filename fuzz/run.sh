#!/usr/bin/env bash
# The fuzzing campaign of issue 17: every target of fuzz/fuzz_targets for SECONDS each (default
# 600), JOBS at a time (default 2), from a corpus seeded with the repository's fixtures. Needs the
# nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Prints a line per target (runs,
# coverage, crashes); crashing inputs land in fuzz/artifacts/TARGET/.
#   fuzz/run.sh [SECONDS] [JOBS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
jobs=${2:-2}
shift $(( $# > 2 ? 2 : $# ))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(pth safetensors image coco vqa tokenizer onnx onnx_graph)

seed() { # seed TARGET FILE...: copy the files under 1 MB into the target's corpus
    local target=$1; shift
    mkdir -p "corpus/$target"
    for f in "$@"; do
        if [ -f "$f" ] && [ "$(stat -c %s "$f")" -le 1048576 ]; then cp "$f" "corpus/$target/"; fi
    done
}
seed pth ../tests/fixtures/*.pth
seed safetensors ../tests/fixtures/*.safetensors ../models/captioner/model.safetensors
seed image ../tests/fixtures/*.png ../tests/fixtures/onnx/input96.png ../tests/bad/* ../data/shapescenes/test/images/000000.png
seed coco ../data/shapescenes/test/instances.json ../data/shapescenes/test/captions.json ../data/photos/instances.json ../tests/fixtures/rle_pycocotools.json
seed tokenizer ../models/captioner/tokenizer.json ../models/vqa/tokenizer.json
seed onnx ../tests/fixtures/onnx/*.onnx
mkdir -p corpus/onnx_graph   # the four seed graphs of onnx_graph.rs, unmutated
for k in 0 1 2 3; do printf "\\$(printf %o $k)" > corpus/onnx_graph/template$k; done
mkdir -p corpus/vqa
{ cat ../data/shapescenes/test/questions.json; printf '\0'; cat ../data/shapescenes/test/annotations.json; } | head -c 1048576 > corpus/vqa/shapescenes

cargo +nightly fuzz build -O >/dev/null 2>&1 || cargo +nightly fuzz build -O
mkdir -p logs
# 2 GB of RSS for a reader; 4 GB for onnx_graph, whose graphs may hold 2 GiB of values (the
# issue's bound for a crafted graph is 4 GB).
printf '%s\n' "${targets[@]}" | xargs -P "$jobs" -I{} sh -c \
    "rss=2048; [ {} = onnx_graph ] && rss=4096; cargo +nightly fuzz run -O {} corpus/{} -- -max_total_time=$seconds -rss_limit_mb=\$rss -timeout=60 -print_final_stats=1 > logs/{}.log 2>&1; echo \$? > logs/{}.exit"
for t in "${targets[@]}"; do
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' || echo '?')
    cov=$(grep -o 'cov: [0-9]*' "logs/$t.log" | tail -1 | grep -o '[0-9]*' || echo '?')
    crashes=$(ls "artifacts/$t" 2>/dev/null | wc -l)
    took=$(grep -o 'Done [0-9]* runs in [0-9]* second' "logs/$t.log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' || echo 'stopped early')
    echo "$t: exit $(cat "logs/$t.exit"), ran $took s, $runs runs, coverage $cov, corpus $(ls "corpus/$t" | wc -l) inputs, $crashes crash files"
done
