"""onnxruntime's time per node of one ONNX file (its own profiler), to set beside `gradcam bench
classify --layers`: the median over `--iters` runs of each node's kernel time, in graph order,
then their sum and the median whole run.

    /work/venv/bin/python bench/ort_layers.py --onnx target/bench-compare/resnet50.onnx --threads 2 --iters 20
"""

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ort_forward import session_and_feed  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--onnx", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        session, feed = session_and_feed(args.onnx, args.threads, profile_prefix=os.path.join(tmp, "ort"))
        for _ in range(2):
            session.run(None, feed)
        runs = []
        for _ in range(args.iters):
            t = time.perf_counter()
            session.run(None, feed)
            runs.append((time.perf_counter() - t) * 1e3)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    nodes = collections.OrderedDict()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            nodes.setdefault(e["name"][: -len("_kernel_time")], (e["args"].get("op_name"), []))[1].append(e["dur"] / 1e3)
    width = max(len(n) for n in nodes)
    total = 0.0
    for name, (op, times) in nodes.items():
        ms = statistics.median(times)
        total += ms
        print(f"{name:<{width}}  {op:<20} {ms:8.3f} ms")
    print(f"{'sum of nodes':<{width}}  {'':<20} {total:8.3f} ms")
    print(f"{'whole run':<{width}}  {'':<20} {statistics.median(runs):8.3f} ms")


if __name__ == "__main__":
    main()
