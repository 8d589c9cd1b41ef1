"""The transformers' table of docs/transformers.md: for each model of a folder written by
`tests/fixtures/make_vit_fixtures.py --full DIR` (torchvision ViT-B/16 and Swin-T, timm
deit_tiny_distilled_patch16_224, seeded weights, opset 17), gradcam's raw maps against PyTorch's
(Grad-CAM at the two golden layers; rollout and relevance where the model has a class token:
largest difference / the reference's maximum), whether the top-1 class agrees, and our Grad-CAM
time (`gradcam bench classify --model X.onnx`, default layer) against onnxruntime's plain forward,
timed in alternating rounds; the ratio is the median of the rounds' ratios.

    /tmp/venv/bin/python bench/vit_table.py DIR [threads] [iters] [rounds]

Writes the table into docs/transformers.md between its `vit:begin` and `vit:end` markers (and
prints it). Needs numpy and onnxruntime; builds nothing (run `cargo build --release` first).
"""

import datetime
import json
import re
import os
import sys

import numpy as np

PAGE = "docs/transformers.md"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from onnx_table import GRADCAM, ort_forward_ms, run  # noqa: E402


def main():
    folder = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    iters = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    goldens = json.load(open(f"{folder}/vit_goldens.json"))
    image = f"{folder}/chelsea224.png"
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    commit = run(["git", "rev-parse", "--short", "HEAD"]).strip()
    lines = [
        f"Made by `bench/vit_table.py` on {datetime.date.today()} at commit {commit}: {threads} threads, 224 x 224, batch 1; "
        f"gradcam's Grad-CAM (default layer) and onnxruntime's forward (random-normal input) each the median of {iters} runs, "
        f"in {rounds} alternating rounds; the ratio is the median of the rounds' ratios.",
        "",
        "| model | layer | method | map difference / max | top-1 equal | our Grad-CAM | onnxruntime forward | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, g in goldens.items():
        path = f"{folder}/{name}.onnx"
        rows = []
        for case in g["cases"]:
            methods = ["gradcam"] + (["rollout", "relevance"] if case["default"] and g.get("prefix") else [])
            args = [GRADCAM, "--threads", str(threads), "classify", image, "--model", path, "--resize", "none", "--class", str(g["class"]), "--method", ",".join(methods), "--json", "--out", "/tmp/vit-table-out"]
            if not case["default"]:
                args += ["--layer", case["value"]]
            rec = json.loads(run(args).splitlines()[0])
            assert rec["layer"] == case["value"], (rec["layer"], case["value"])
            top1 = rec["predictions"][0]["class"] == int(np.argmax(g["logits"]))
            for e in rec["explanations"]:
                ref = np.array(case["cam"] if e["method"] == "gradcam" else g[e["method"]])
                diff = float(np.abs(np.array(e["cam"]) - ref).max() / np.abs(ref).max())
                layer = f"`{case['module']}`" + (" (default)" if case["default"] else "")
                rows.append((layer, e["method"], diff, top1))
        ours, theirs, ratios = [], [], []
        for _ in range(rounds):
            b = run([GRADCAM, "--threads", str(threads), "bench", "classify", "--model", path, "--iters", str(iters), "--json"])
            o = json.loads(b)["gradcam_ms"]
            t = ort_forward_ms(path, x, threads, iters)
            ours.append(o)
            theirs.append(t)
            ratios.append(o / t)
        timing = f"{np.median(ours):.1f} ms | {np.median(theirs):.1f} ms | {np.median(ratios):.2f}x"
        for i, (layer, method, diff, top1) in enumerate(rows):
            lines.append(f"| {name} | {layer} | {method} | {diff:.1e} | {'yes' if top1 else 'NO'} | " + (timing if i == 0 else "| | ") + " |")
        lines.append("")
        lines[-1] = f"| | | | | | rounds: {', '.join(f'{o:.0f} / {t:.0f}' for o, t in zip(ours, theirs))} ms | | |"
    table = "\n".join(lines)
    print(table)
    page = open(PAGE).read()
    page = re.sub(r"<!-- vit:begin -->.*<!-- vit:end -->", lambda _: f"<!-- vit:begin -->\n{table}\n<!-- vit:end -->", page, flags=re.S)
    open(PAGE, "w").write(page)


if __name__ == "__main__":
    main()
