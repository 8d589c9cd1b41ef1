#!/usr/bin/env bash
# Copies the results of `gradcam demo bias --out DIR` into docs/evaluations.md (between its
# `bias:begin` / `bias:end` markers: the report's tables and trust sentence; the only place those
# figures appear) and DIR/grid.png to docs/bias_grid.png. Never edit those numbers by hand; run
# `gradcam demo bias`, then this.
#   scripts/bias_readme.sh DIR
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: scripts/bias_readme.sh DIR (the --out of gradcam demo bias)}
page=docs/evaluations.md
if ! grep -q '<!-- bias:begin -->' "$page" || ! grep -q '<!-- bias:end -->' "$page"; then
    echo "$page has no bias:begin / bias:end markers" >&2
    exit 1
fi
cp "$dir/grid.png" docs/bias_grid.png
commit=$(git rev-parse --short HEAD)
python3 - "$dir/report.md" "$commit" "$page" <<'PY'
import sys
report, commit, page = open(sys.argv[1]).read(), sys.argv[2], sys.argv[3]
# Everything from the first table to the grid's row table (which describes rows of grid.png).
body = report[report.index("| | biased | balanced |"):report.index("| row | image |")].strip()
body = body.replace("`grid.png`: each row is a test image, then the Grad-CAM map of the biased model's predicted class, then the balanced model's.", "").strip()
tail = report[report.index("Reproduce:"):].strip()
doc = open(page).read()
begin, end = "<!-- bias:begin -->", "<!-- bias:end -->"
head, rest = doc.split(begin, 1)
_, after = rest.split(end, 1)
text = f"{body}\n\n{tail} Commit {commit}."
open(page, "w").write(head + begin + "\n" + text + "\n" + end + after)
PY
echo "wrote the bias section of $page and docs/bias_grid.png" >&2
