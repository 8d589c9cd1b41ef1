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
# (method, layer): the default layer (the last block's attention input) unless named.
METHODS = [(m, None) for m in ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "rollout", "relevance"]] + [("gradcam", "visual.blocks.2.norm1")]


def run(data, model, method, layer):
    out = tempfile.mkdtemp()
    t0 = time.time()
    args = [os.path.join(ROOT, "target", "release", "gradcam"), "eval", "pointing,energy,segmentation", "--model", model, "--data", data,
            "--method", method, "--tolerance", "0.0625", "--out", out]
    subprocess.run(args + (["--layer", layer] if layer else []), check=True, capture_output=True)
    s = json.load(open(os.path.join(out, "summary.json")))
    return s, time.time() - t0


def phrase_ranking(data, model):
    """Of each object's comparisons with the colour-shape pairs absent from its scene, the share
    its own phrase wins (by `gradcam match` similarities), and the share of objects that win all."""
    colors, shapes = ["red", "green", "blue", "yellow", "purple"], ["circle", "square", "triangle"]
    phrases = [f"{c} {s}" for c in colors for s in shapes]
    inst = json.load(open(os.path.join(data, "instances.json")))
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    files = {i["id"]: i["file_name"] for i in inst["images"]}
    objects = {}
    for a in inst["annotations"]:
        objects.setdefault(files[a["image_id"]], []).append(f"{a['color']} {cats[a['category_id']]}")
    images = [os.path.join(data, "images", f) for f in sorted(objects)]
    args = [os.path.join(ROOT, "target", "release", "gradcam"), "match", *images, "--model", model, "--json", "--out", tempfile.mkdtemp()]
    for p in phrases:
        args += ["--text", p]
    import random
    rng = random.Random(0)
    won = total = all_won = count = drawn_won = 0
    for line in subprocess.run(args, check=True, capture_output=True, text=True).stdout.splitlines():
        r = json.loads(line)
        sims = {t["text"]: t["similarity"] for t in r["texts"]}
        present = objects[os.path.basename(r["image"])]
        for own in present:
            absent = [p for p in phrases if p not in present]
            wins = [sims[own] > sims[p] for p in absent]
            won, total, all_won, count = won + sum(wins), total + len(wins), all_won + all(wins), count + 1
            # One absent pair drawn per object (seeded).
            drawn_won += sims[own] > sims[rng.choice(absent)]
    return won / total, all_won / count, count, drawn_won / count


def main():
    data = sys.argv[1]
    model = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "models", "clip")
    rows, summary = [], None
    for m, layer in METHODS:
        s, secs = run(data, model, m, layer)
        summary = s
        o = s["overall"]
        p, seg = o["pointing"], o["segmentation"]
        rows.append((m + (f" at `{layer}`" if layer else ""), p["hits"] / p["count"], p["centre_hits"] / p["count"], o["energy_fraction"]["mean"], seg["miou_seeded"], seg["miou_threshold"], secs))
        print(m, rows[-1], file=sys.stderr)
    best = max(rows, key=lambda r: r[1])
    info = json.load(open(os.path.join(data, "instances.json"))).get("info", {})
    table = [f"`gradcam eval pointing,energy,segmentation --model {os.path.relpath(model, ROOT) if model.startswith(ROOT) else model} --data {data} --method M --tolerance 0.0625`: "
             f"{summary['images']} images of ShapeScenes' {info.get('split', '')} split of seed {info.get('seed', '?')} (`gradcam scenes --seed {info.get('seed', '?')}`; models/clip trained on seed 0), {summary['cases']} phrases (each colour-shape pair in a scene; its objects are the ground truth); "
             "pointing: the map's peak on the phrase's object or within 1/16 of the side (4 px); energy: the share of the map's mass in the object's box; "
             "segmentation: mIoU of the map's seeded segmentation (and of the thresholded map) with the object's mask. "
             "Every map at the last block's attention input unless a layer is named; the best pointing in bold.", "",
             "| method | pointing | centre baseline | energy in box | mIoU seeded | mIoU thresholded |", "|---|---|---|---|---|---|"]
    for m, p, c, e, s1, s2, _ in rows:
        b = "**" if m == best[0] else ""
        table.append(f"| {m} | {b}{p:.3f}{b} | {c:.3f} | {e:.3f} | {s1:.3f} | {s2:.3f} |")
    vs, beats, objects, drawn = phrase_ranking(data, model)
    table += ["", f"Phrase ranking, {objects} objects (same images, `gradcam match` with the 15 colour-shape phrases): an object's own phrase is more similar to the image "
              f"than a colour-shape pair absent from its scene (one drawn per object, seeded) for **{drawn:.3f}** of the objects; over all (object, absent pair) comparisons "
              f"in {vs:.3f} of them; than every absent pair's for {beats:.3f} of the objects."]
    text = "\n".join(table) + "\n"
    for path, begin, end in [(os.path.join(ROOT, "docs", "clip.md"), "<!-- clip:begin -->", "<!-- clip:end -->"), (os.path.join(ROOT, "README.md"), "<!-- clip-readme:begin -->", "<!-- clip-readme:end -->")]:
        doc = open(path).read()
        doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: begin + "\n" + text + end, doc, flags=re.S)
        open(path, "w").write(doc)
    print(text)


if __name__ == "__main__":
    main()
