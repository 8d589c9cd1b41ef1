"""The README's ONNX table: for each model of a folder written by
`tests/fixtures/make_onnx_fixtures.py --full DIR`, gradcam's raw Grad-CAM map of the golden class
at the golden layers against PyTorch's (largest difference / map maximum), whether the top-5
classes agree, our Grad-CAM time (`gradcam bench classify --model X.onnx`) and onnxruntime's plain
forward; with EfficientNet-Lite0, also the ratio to the built-in EfficientNet-Lite0 timed in
alternation (`--against`).

    /tmp/venv/bin/python bench/onnx_table.py DIR [threads] [iters]

Needs numpy and onnxruntime; builds nothing (run `cargo build --release` first).
"""

import datetime
import json
import subprocess
import sys
import time

import numpy as np

GRADCAM = "./target/release/gradcam"


def run(args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(args)}\n{r.stderr}")
    return r.stdout


def ort_forward_ms(path, x, threads, iters):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def main():
    folder = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    iters = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    goldens = json.load(open(f"{folder}/goldens.json"))
    image = f"{folder}/chelsea224.png"
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    commit = run(["git", "rev-parse", "--short", "HEAD"]).strip()
    print(f"Made by `bench/onnx_table.py` on {datetime.date.today()} at commit {commit}, {threads} threads, 224 x 224, batch 1, medians of {iters} runs.\n")
    print("| model (torchvision export) | nodes | layer | map difference / max | top-5 equal | our Grad-CAM | onnxruntime forward | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name, g in goldens.items():
        path = f"{folder}/{name}.onnx"
        for case in g["cases"]:
            args = [GRADCAM, "--threads", str(threads), "classify", image, "--model", path, "--resize", "none", "--class", str(case["class"]), "--json", "--out", "/tmp/onnx-table-out"]
            if not case["default"]:
                args += ["--layer", case["value"]]
            rec = json.loads(run(args))
            assert rec["layer"] == case["value"], (rec["layer"], case["value"])
            cam, ref = np.array(rec["explanations"][0]["cam"]), np.array(case["cam"])
            diff = float(np.abs(cam - ref).max() / ref.max())
            top5 = [p["class"] for p in rec["predictions"]] == list(np.argsort(g["logits"])[::-1][:5])
            case["diff"], case["top5"] = diff, top5
        ours = json.loads(run([GRADCAM, "--threads", str(threads), "bench", "classify", "--model", path, "--iters", str(iters), "--json"]))
        ort_ms = ort_forward_ms(path, x, threads, iters)
        import onnx

        nodes = len(onnx.load(path, load_external_data=False).graph.node)
        for case in g["cases"]:
            layer = f"`{case['module']}`" + (" (default)" if case["default"] else "")
            print(f"| {name} | {nodes} | {layer} | {case['diff']:.1e} | {'yes' if case['top5'] else 'NO'} | {ours['gradcam_ms']:.1f} ms | {ort_ms:.1f} ms | {ours['gradcam_ms'] / ort_ms:.2f}x |")
    if "efficientnet_lite0" in goldens:
        pair = json.loads(run([GRADCAM, "--threads", str(threads), "bench", "classify", "--model", f"{folder}/efficientnet_lite0.onnx", "--against", "efficientnet-lite0", "--iters", str(iters), "--json"]))
        print(f"\nEfficientNet-Lite0 from ONNX against the built-in one, Grad-CAM in alternation: {pair['gradcam_ms']:.1f} ms vs {pair['against_gradcam_ms']:.1f} ms, ratio {pair['ratio']:.3f}.")


if __name__ == "__main__":
    main()
