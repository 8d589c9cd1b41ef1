"""The methods on ground truth for a CLIP: `gradcam eval pointing,energy,segmentation` on each
object's colour-shape phrase of a ShapeScenes split the model never saw, every method in turn;
writes the table into docs/clip.md and README.md (between their `clip` markers).

    cargo build --release
    target/release/gradcam scenes --out /tmp/ss-hidden --n 10000 --seed 7   # not the training set's seed (0)
    python3 bench/clip_table.py /tmp/ss-hidden/test [models/clip]
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "rollout", "relevance"]


def run(data, model, method):
    out = tempfile.mkdtemp()
    t0 = time.time()
    subprocess.run([os.path.join(ROOT, "target", "release", "gradcam"), "eval", "pointing,energy,segmentation", "--model", model, "--data", data,
                    "--method", method, "--tolerance", "0.0625", "--out", out], check=True, capture_output=True)
    s = json.load(open(os.path.join(out, "summary.json")))
    return s, time.time() - t0


def main():
    data = sys.argv[1]
    model = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "models", "clip")
    rows, summary = [], None
    for m in METHODS:
        s, secs = run(data, model, m)
        summary = s
        o = s["overall"]
        p, seg = o["pointing"], o["segmentation"]
        rows.append((m, p["hits"] / p["count"], p["centre_hits"] / p["count"], o["energy_fraction"]["mean"], seg["miou_seeded"], seg["miou_threshold"], secs))
        print(m, rows[-1], file=sys.stderr)
    best = max(rows, key=lambda r: r[1])
    table = [f"`gradcam eval pointing,energy,segmentation --model {os.path.relpath(model, ROOT) if model.startswith(ROOT) else model} --data {data} --method M --tolerance 0.0625`: "
             f"{summary['images']} images, {summary['cases']} phrases (each colour-shape pair in a scene; its objects are the ground truth); "
             "pointing: the map's peak on the phrase's object or within 1/16 of the side (4 px); energy: the share of the map's mass in the object's box; "
             "segmentation: mIoU of the map's seeded segmentation (and of the thresholded map) with the object's mask.", "",
             "| method | pointing | centre baseline | energy in box | mIoU seeded | mIoU thresholded |", "|---|---|---|---|---|---|"]
    for m, p, c, e, s1, s2, _ in rows:
        b = "**" if m == best[0] else ""
        table.append(f"| {m} | {b}{p:.3f}{b} | {c:.3f} | {e:.3f} | {s1:.3f} | {s2:.3f} |")
    text = "\n".join(table) + "\n"
    for path, begin, end in [(os.path.join(ROOT, "docs", "clip.md"), "<!-- clip:begin -->", "<!-- clip:end -->"), (os.path.join(ROOT, "README.md"), "<!-- clip-readme:begin -->", "<!-- clip-readme:end -->")]:
        doc = open(path).read()
        doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: begin + "\n" + text + end, doc, flags=re.S)
        open(path, "w").write(doc)
    print(text)


if __name__ == "__main__":
    main()
