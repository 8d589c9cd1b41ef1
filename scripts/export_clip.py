"""Export a CLIP-style image-text model as the "ONNX pair" folder `gradcam match --model DIR` reads.

Run in a virtual environment outside the repo:

    python3 -m venv /tmp/venv
    /tmp/venv/bin/pip install torch open_clip_torch transformers onnx onnxruntime
    /tmp/venv/bin/python scripts/export_clip.py --open-clip ViT-B-32 --pretrained openai --out DIR
    /tmp/venv/bin/python scripts/export_clip.py --open-clip ViT-B-32 --pretrained FILE.bin --out DIR
    /tmp/venv/bin/python scripts/export_clip.py --hf openai/clip-vit-base-patch32 --out DIR   # or a local folder
    /tmp/venv/bin/python scripts/export_clip.py --open-clip ViT-B-32 --seed 0 --out DIR       # seeded random weights

The folder holds

- config.json: {"image_size", "mean", "std", "context_length", "pad_id", "image": "image.onnx",
  "text": "text.onnx", "tokenizer": "tokenizer.json"};
- image.onnx: input `pixels` float32 [1, 3, S, S] (already normalised with mean / std) -> the
  image embedding [1, E] (`encode_image` of open_clip, `get_image_features` of transformers; not
  L2-normalised);
- text.onnx: input `input_ids` int64 [1, L] (start token, the words' BPE ids, end token, then
  `pad_id` up to L; open_clip truncates to L keeping the end token last) -> the text embedding
  [1, E] (`encode_text` / `get_text_features`; not normalised);
- tokenizer.json: a Hugging Face `tokenizers` file whose encoding (special tokens added, no
  padding, no truncation) gives the start token, the BPE ids and the end token. For open_clip's
  own SimpleTokenizer it is built from open_clip's bundled bpe_simple_vocab_16e6.txt.gz the way
  OpenAI's CLIP / transformers build vocab.json and merges.txt, then transformers' CLIP tokenizer
  writes it (compact JSON); for a transformers model it is the model's own tokenizer.json.

Both graphs are exported by `torch.onnx.export` (the TorchScript exporter, opset 17, batch 1)
and checked against PyTorch with onnxruntime. `--seed N` redraws every parameter with a seeded
generator (for tests: no download). The script prints the ONNX value name of the last
resblock's attention-input LayerNorm output (ln_1, transformers' layer_norm1), gradcam's
default layer, to pass to `--layer` if needed.
"""

import argparse
import gzip
import json
import math
import os
import re
import sys
import tempfile

import numpy as np
import onnx
import torch
import torch.nn as nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTower(nn.Module):
    def __init__(self, clip, hf=False):
        super().__init__()
        self.clip, self.hf = clip, hf

    def forward(self, pixels):
        if not self.hf:
            return self.clip.encode_image(pixels)
        out = self.clip.get_image_features(pixel_values=pixels)
        return out if torch.is_tensor(out) else out.pooler_output


class TextTower(nn.Module):
    def __init__(self, clip, hf=False):
        super().__init__()
        self.clip, self.hf = clip, hf

    def forward(self, input_ids):
        if not self.hf:
            return self.clip.encode_text(input_ids)
        out = self.clip.get_text_features(input_ids=input_ids)
        return out if torch.is_tensor(out) else out.pooler_output


def reseed(model, seed):
    """Every parameter drawn again (as make_vit_fixtures.py does): matrices N(0, 1/fan_in),
    LayerNorm scales around 1 and shifts N(0, 0.1), token / class / position embeddings
    N(0, 0.5), biases N(0, 0.1); the logit scale is kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if "logit" in name:
                continue
            if "embedding" in name and "patch_embedding" not in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif re.search(r"(^|\.)(ln|norm|layer_?norm|layrnorm|pre_layrnorm|post_layernorm|final_layer_norm)", name) or "norm" in name:
                p.copy_((1.0 + 0.2 * torch.randn(p.shape, generator=g)) if leaf == "weight" else 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() > 1:
                # open_clip's `visual.proj` and `text_projection` are used as x @ P: fan-in first.
                fan_in = p.shape[0] if leaf in ("proj", "text_projection") else p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def clip_bpe_tokenizer(path):
    """tokenizer.json of open_clip's SimpleTokenizer (OpenAI CLIP's BPE), written compactly."""
    import transformers
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = merges[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({v: i for i, v in enumerate(vocab)}, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = transformers.CLIPTokenizerFast.from_pretrained(tmp)
    assert tok.convert_tokens_to_ids("<|startoftext|>") == 49406 and tok.convert_tokens_to_ids("<|endoftext|>") == 49407
    save_tokenizer(tok.backend_tokenizer, path)


def save_tokenizer(backend, path):
    backend.no_padding()
    backend.no_truncation()
    backend.save(path, pretty=False)


def load_open_clip(name, pretrained, seed):
    import open_clip

    model = open_clip.create_model(name, pretrained=None if seed is not None else pretrained)
    if seed is not None:
        reseed(model, seed)
    model.eval()
    pre = getattr(model.visual, "preprocess_cfg", None) or {}
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = list(pre.get("mean", OPENAI_MEAN))
    std = list(pre.get("std", OPENAI_STD))
    tokenizer = open_clip.get_tokenizer(name)
    context = int(getattr(model, "context_length", None) or tokenizer.context_length)

    def write_tokenizer(path):
        if isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
            clip_bpe_tokenizer(path)
            return 0
        # An open_clip model with a transformers tokenizer (its own ids, its own pad id).
        print(f"note: {name} uses {type(tokenizer).__name__}, not CLIP's BPE: its tokenizer.json is saved as is", file=sys.stderr)
        save_tokenizer(tokenizer.tokenizer.backend_tokenizer, path)
        return int(tokenizer.tokenizer.pad_token_id or 0)

    return model, False, size, mean, std, context, write_tokenizer


def load_hf(source, seed):
    import transformers

    model = transformers.CLIPModel.from_pretrained(source, attn_implementation="eager")
    if seed is not None:
        reseed(model, seed)
    model.eval()
    size = model.config.vision_config.image_size
    mean, std = list(OPENAI_MEAN), list(OPENAI_STD)
    try:
        proc = transformers.CLIPImageProcessor.from_pretrained(source)
        mean, std = list(proc.image_mean), list(proc.image_std)
    except Exception as e:  # no preprocessor_config.json: CLIP's constants
        print(f"note: no image processor config ({type(e).__name__}): CLIP's mean and std", file=sys.stderr)
    tok = transformers.CLIPTokenizerFast.from_pretrained(source)
    context = int(model.config.text_config.max_position_embeddings)

    def write_tokenizer(path):
        save_tokenizer(tok.backend_tokenizer, path)
        return int(tok.pad_token_id)

    return model, True, size, mean, std, context, write_tokenizer


def default_layer(onnx_path):
    """The output of the last block's attention-input LayerNorm (open_clip's
    resblocks.N.ln_1, transformers' layers.N.layer_norm1), found by node name."""
    g = onnx.load(onnx_path, load_external_data=False).graph
    blocks = {}
    for n in g.node:
        m = re.search(r"(?:resblocks|layers)\.(\d+)/(?:ln_1|layer_norm1)/", n.name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(n)
    if not blocks:
        return None
    nodes = blocks[max(blocks)]
    # The LayerNormalization's output (open_clip's LayerNorm adds a float -> float Cast after
    # it: the same values); else the last node of a decomposed LayerNorm.
    norms = [n for n in nodes if n.op_type == "LayerNormalization"]
    return (norms[-1] if norms else nodes[-1]).output[0]


def export_pair(model, hf, size, context, out):
    image, text = ImageTower(model, hf).eval(), TextTower(model, hf).eval()
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(1, context, dtype=torch.long)
    ids[0, :3] = torch.tensor([49406, 320, 49407])  # traced only: the values do not matter
    torch.onnx.export(image, (pixels,), os.path.join(out, "image.onnx"), dynamo=False, opset_version=17,
                      input_names=["pixels"], output_names=["embedding"])
    torch.onnx.export(text, (ids,), os.path.join(out, "text.onnx"), dynamo=False, opset_version=17,
                      input_names=["input_ids"], output_names=["embedding"])
    return image, text


def check_ort(image, text, out, pixels, ids):
    """Max |onnxruntime - PyTorch| of both embeddings."""
    import onnxruntime as ort

    diffs = {}
    for name, tower, feed in (("image", image, {"pixels": pixels}), ("text", text, {"input_ids": ids})):
        sess = ort.InferenceSession(os.path.join(out, f"{name}.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        with torch.no_grad():
            want = tower(*feed.values()).numpy()
        diffs[name] = float(np.abs(got - want).max())
        print(f"{name}.onnx: embedding {list(got.shape)}, max |onnxruntime - torch| = {diffs[name]:.3g} (|torch| max {np.abs(want).max():.3g})")
    return diffs


def write_folder(model, hf, size, mean, std, context, write_tokenizer, out):
    """tokenizer.json, image.onnx, text.onnx and config.json of `model` in `out`, checked with
    onnxruntime; returns (config, the default layer's ONNX value, the max abs differences)."""
    import tokenizers

    os.makedirs(out, exist_ok=True)
    pad_id = write_tokenizer(os.path.join(out, "tokenizer.json"))
    image, text = export_pair(model, hf, size, context, out)
    config = {"image_size": int(size), "mean": [float(v) for v in mean], "std": [float(v) for v in std],
              "context_length": context, "pad_id": pad_id, "image": "image.onnx", "text": "text.onnx",
              "tokenizer": "tokenizer.json"}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    ids = tokenizers.Tokenizer.from_file(os.path.join(out, "tokenizer.json")).encode("a photo of a cat").ids[:context]
    padded = torch.full((1, context), pad_id, dtype=torch.long)
    padded[0, :len(ids)] = torch.tensor(ids)
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    diffs = check_ort(image, text, out, pixels, padded)
    layer = default_layer(os.path.join(out, "image.onnx"))
    print(f"config: {json.dumps(config)}")
    print(f"default layer (last block's ln_1 output): {layer}" if layer else "no ln_1 / layer_norm1 node found in image.onnx: pass --layer")
    return config, layer, diffs


def load(kind, source, pretrained, seed):
    """(model, hf, image size, mean, std, context length, tokenizer writer)."""
    if kind == "open_clip":
        return load_open_clip(source, pretrained, seed)
    return load_hf(source, seed)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--open-clip", metavar="MODEL_NAME", help="an open_clip model name, e.g. ViT-B-32")
    src.add_argument("--hf", metavar="DIR_OR_ID", help="a transformers CLIPModel folder or hub id")
    p.add_argument("--pretrained", metavar="TAG_OR_FILE", help="open_clip pretrained tag or checkpoint file")
    p.add_argument("--seed", type=int, help="seeded random weights instead of pretrained ones")
    p.add_argument("--out", required=True, metavar="DIR")
    a = p.parse_args()
    torch.set_num_threads(2)
    loaded = load("open_clip", a.open_clip, a.pretrained, a.seed) if a.open_clip else load("hf", a.hf, None, a.seed)
    write_folder(*loaded, a.out)


if __name__ == "__main__":
    main()
