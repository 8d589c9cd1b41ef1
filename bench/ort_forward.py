"""onnxruntime's forward of one ONNX file on the benchmark input: prints the median milliseconds
of `--iters` runs after two warm-up runs. bench/compare.sh alternates it with `gradcam bench
classify`, so that both sides of the ratio are timed close together on a shared machine.

    /work/venv/bin/python bench/ort_forward.py --onnx target/bench-compare/resnet50.onnx --threads 2 --iters 10
"""

import argparse
import os
import sys

import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_gradcam import bench_input, median_ms  # noqa: E402  (the input gradcam's bench uses)


def session_and_feed(onnx, threads, profile_prefix=None):
    """A CPU session on `threads` intra-op threads (profiling to `profile_prefix` when given) and
    its feed: the benchmark input."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    return session, {session.get_inputs()[0].name: bench_input().numpy()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--onnx", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    session, feed = session_and_feed(args.onnx, args.threads)
    print(f"{median_ms(lambda: session.run(None, feed), args.iters):.4f}")


if __name__ == "__main__":
    main()
