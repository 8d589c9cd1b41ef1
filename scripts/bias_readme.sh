#!/usr/bin/env bash
# Copies the results of `gradcam demo bias --out DIR` into the README (between its `bias:begin` /
# `bias:end` markers: the report's tables and trust sentence) and DIR/grid.png to
# docs/bias_grid.png. Never edit those numbers by hand; run `gradcam demo bias`, then this.
#   scripts/bias_readme.sh DIR
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: scripts/bias_readme.sh DIR (the --out of gradcam demo bias)}
cp "$dir/grid.png" docs/bias_grid.png
commit=$(git rev-parse --short HEAD)
python3 - "$dir/report.md" "$commit" <<'PY'
import sys
report, commit = open(sys.argv[1]).read(), sys.argv[2]
# Everything from the first table to the grid's row table (which describes rows of grid.png).
body = report[report.index("| | biased | balanced |"):report.index("| row | image |")].strip()
body = body.replace("`grid.png`: each row is a test image, then the Grad-CAM map of the biased model's predicted class, then the balanced model's.", "").strip()
tail = report[report.index("Reproduce:"):].strip()
readme = open("README.md").read()
begin, end = "<!-- bias:begin -->", "<!-- bias:end -->"
head, rest = readme.split(begin, 1)
_, after = rest.split(end, 1)
text = f"{body}\n\n{tail} Commit {commit}."
open("README.md", "w").write(head + begin + "\n" + text + "\n" + end + after)
PY
echo "wrote the README's bias section and docs/bias_grid.png" >&2
