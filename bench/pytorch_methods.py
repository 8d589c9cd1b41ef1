"""Times every method of pytorch-grad-cam 1.5.x on EfficientNet-Lite0 with the same weights, input
and thread count as `gradcam bench methods`, and prints one JSON line of medians (milliseconds,
from the input tensor to the 224 x 224 map of the top-1 class).

    /tmp/venv/bin/python bench/pytorch_methods.py --threads 2 --iters 10 [--methods gradcam,scorecam] [--input FILE]

Ablation-CAM and Score-CAM run once (they take minutes). Guided Backpropagation is
pytorch-grad-cam's GuidedBackpropReLUModel; Guided Grad-CAM is its recipe, GradCAM times it.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
from make_goldens import efficientnet_lite0  # noqa: E402
from pytorch_grad_cam import (AblationCAM, EigenCAM, GradCAM, GradCAMPlusPlus, GuidedBackpropReLUModel,  # noqa: E402
                              HiResCAM, LayerCAM, ScoreCAM, XGradCAM)
from pytorch_grad_cam.utils.image import deprocess_image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_gradcam import bench_input, median_ms  # noqa: E402

CAMS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM, "xgradcam": XGradCAM,
        "layercam": LayerCAM, "eigencam": EigenCAM, "ablationcam": AblationCAM, "scorecam": ScoreCAM}
ALL = list(CAMS) + ["guided-backprop", "guided-gradcam"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--methods", default=",".join(ALL))
    p.add_argument("--input", help="a safetensors file with the preprocessed tensor `input` (default: the synthetic pattern)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, layer = efficientnet_lite0()
    inp = bench_input()
    if args.input:
        from safetensors.torch import load_file
        inp = load_file(args.input)["input"]

    out = {}
    for name in args.methods.split(","):
        if name in CAMS:
            cam = CAMS[name](model=model, target_layers=[layer])

            def run():
                cam(input_tensor=inp, targets=None)
        else:
            gb_model = GuidedBackpropReLUModel(model=model, device="cpu")
            cam = GradCAM(model=model, target_layers=[layer])

            def run():
                gb = gb_model(inp.clone(), target_category=None)
                if name == "guided-gradcam":
                    mask = cam(input_tensor=inp, targets=None)[0]
                    gb = gb * np.stack([mask] * 3, axis=-1)
                deprocess_image(gb)
        runs = 1 if name in ("ablationcam", "scorecam") else args.iters
        out[name] = median_ms(run, runs, warmup=1 if runs > 1 else 0)
        print(f"{name}: {out[name]:.1f} ms", file=sys.stderr)
    print(json.dumps({"model": "efficientnet-lite0", "threads": args.threads, "iters": args.iters, "torch": torch.__version__, "methods": out}))


if __name__ == "__main__":
    main()
