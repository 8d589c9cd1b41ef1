"""Draws docs/clip_scene.png: a scene, several texts, each text's Grad-CAM and relevance map side
by side (the pictures `gradcam match` writes), with each text's similarity.

    cargo build --release
    python3 docs/make_clip_picture.py            # needs Pillow

The scene is ShapeScenes' (`gradcam scenes --out DIR --n 200 --seed 99 --size 128`, test image
000190.png), copied to data/clip/scene128.png; the model is models/clip. `IMAGE TEXT...` as
arguments draw another scene (`CLIP_PICTURE=FILE` writes it elsewhere).
"""

import json
import os
import subprocess
import sys
import tempfile

from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "data", "clip", "scene128.png")
TEXTS = ["red circle", "yellow circle", "blue triangle", "blue square"]
SIDE = 192


def main():
    global IMAGE, TEXTS
    if len(sys.argv) > 2:  # another scene: IMAGE TEXT...
        IMAGE, TEXTS = sys.argv[1], sys.argv[2:]
    out = tempfile.mkdtemp()
    args = [os.path.join(ROOT, "target", "release", "gradcam"), "match", IMAGE, "--model", os.path.join(ROOT, "models", "clip"),
            "--method", "gradcam,relevance", "--json", "--out", out]
    for t in TEXTS:
        args += ["--text", t]
    record = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout.splitlines()[0])
    label_w, pad = 150, 6
    rows = len(record["texts"])
    sheet = Image.new("RGB", (label_w + 3 * (SIDE + pad), 24 + rows * (SIDE + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(["image", "Grad-CAM", "relevance"]):
        draw.text((label_w + c * (SIDE + pad) + 4, 6), title, fill="black")
    scene = Image.open(IMAGE).convert("RGB").resize((SIDE, SIDE), Image.NEAREST)
    for r, t in enumerate(record["texts"]):
        y = 24 + r * (SIDE + pad)
        draw.text((6, y + SIDE // 2 - 12), f'"{t["text"]}"', fill="black")
        draw.text((6, y + SIDE // 2 + 4), f'similarity {t["similarity"]:.3f}', fill="black")
        sheet.paste(scene, (label_w, y))
        for c, e in enumerate(t["explanations"]):
            sheet.paste(Image.open(e["overlay"]).convert("RGB").resize((SIDE, SIDE), Image.NEAREST), (label_w + (c + 1) * (SIDE + pad), y))
    path = os.environ.get("CLIP_PICTURE", os.path.join(ROOT, "docs", "clip_scene.png"))
    sheet.save(path, optimize=True)
    print("wrote", path, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
