"""Where the frozen backbones of a DETRIS base come from, and whether they equal the public checkpoints.

`detris convert --split-adapters` writes `backbone_provenance.json` into the base folder: the official files the
backbones were taken from (name, size, SHA-256), a fingerprint of each backbone (SHA-256 over names, dtypes, shapes
and bytes), whether its values are exactly representable in fp16, and the public checkpoint it corresponds to. Whether
the weights *equal* that public checkpoint cannot be known offline, so the file says "not checked" until

    detris provenance --base DIR                       # downloads the public backbones (or give local folders)
    detris provenance --base DIR --vision path/to/dinov2 --text path/to/clip

compares them tensor by tensor and records the result. The official CLIP text weights are OpenAI's fp16 release cast
to fp32, so the text comparison also reports how many tensors match after rounding the
public weights to fp16.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
from pathlib import Path

from configuration_detris.release import PUBLIC_TEXT_BACKBONE, PUBLIC_TEXT_BACKBONE_SHAPE, PUBLIC_VISION_BACKBONES

PROVENANCE_FILE = "backbone_provenance.json"
NOT_CHECKED = "not checked (needs the public checkpoint): run `detris provenance --base <this folder>`"


def public_vision_id(config) -> str | None:
    """The public DINOv2-with-registers checkpoint of this width and depth, or None."""
    return PUBLIC_VISION_BACKBONES.get((config.vision_config.hidden_size, config.vision_config.num_hidden_layers))


def public_text_id(config) -> str | None:
    """The public CLIP checkpoint whose text tower has this shape, or None."""
    text = config.text_config
    return PUBLIC_TEXT_BACKBONE if (text.hidden_size, text.num_hidden_layers, text.vocab_size) == PUBLIC_TEXT_BACKBONE_SHAPE else None


def backbone_tensors(model) -> dict[str, dict[str, torch.Tensor]]:
    """The frozen backbone tensors of a DETRIS model in the public checkpoints' names: `vision` as in
    `Dinov2WithRegistersModel`, `text` as in `CLIPTextModelWithProjection` (the model's own key names, adapters left
    out)."""
    adapter_keys = set(model.adapter_state_dict())
    out = {}
    for role, attribute in (("vision", "vision_model"), ("text", "text_model")):
        module = getattr(model, attribute)
        out[role] = {name: tensor for name, tensor in module.state_dict().items() if f"{attribute}.{name}" not in adapter_keys}
    return out


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted names, dtypes, shapes and raw bytes: equal fingerprints mean bit-identical tensors."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fp16_representable(tensors: dict[str, torch.Tensor]) -> bool:
    """True when every floating-point value survives a round trip through fp16 unchanged."""
    import torch

    for tensor in tensors.values():
        if tensor.is_floating_point() and not torch.equal(tensor.to(torch.float16).to(tensor.dtype), tensor):
            return False
    return True


def file_sha256(path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def make_provenance(model, checkpoints: list[dict], variant: str | None = None) -> dict:
    """The provenance record of a base model converted from official checkpoints. `checkpoints`: one dict per
    source file (`file`, `sha256`, `bytes`, `dataset`)."""
    tensors = backbone_tensors(model)
    sources = ", ".join(c["file"] for c in checkpoints)
    record = {
        "format": 1,
        "variant": variant,
        "source": (
            f"the frozen dinov2.* and txt_backbone.* tensors of the official DETRIS checkpoint(s) {sources}, "
            "bit-identical in every one of them (checked by detris convert)"
        ),
        "checkpoints": checkpoints,
        "how_to_check": "detris provenance --base <this folder> [--vision ID_OR_DIR] [--text ID_OR_DIR]",
    }
    public = {"vision": public_vision_id(model.config), "text": public_text_id(model.config)}
    notes = {
        "vision": "DINOv2 with 4 registers, as trained by Meta; DETRIS keeps it frozen",
        "text": (
            "CLIP ViT-B/16 text tower; the official code loads OpenAI's fp16 release (ViT-B-16.pt) and casts it to "
            "fp32, so official values are fp16-rounded (fp16_representable says whether these are)"
        ),
    }
    for role, values in tensors.items():
        record[role] = {
            "public_counterpart": public[role],
            "tensors": len(values),
            "parameters": int(sum(t.numel() for t in values.values())),
            "sha256": fingerprint(values),
            "fp16_representable": fp16_representable(values),
            "equal_to_public": NOT_CHECKED if public[role] else "no public counterpart of this shape",
            "note": notes[role],
        }
    return record


def compare_tensors(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    """Tensor-by-tensor comparison: counts of bit-identical tensors, of tensors equal once the reference is rounded to
    fp16, the largest absolute difference, and the names that differ / are missing / are extra."""
    import torch

    missing = sorted(set(reference) - set(ours))
    extra = sorted(set(ours) - set(reference))
    identical, after_fp16, differing, max_diff = 0, 0, [], 0.0
    for name in sorted(set(ours) & set(reference)):
        a, b = ours[name].detach().cpu(), reference[name].detach().cpu()
        if a.shape != b.shape:
            differing.append(f"{name} (shape {list(a.shape)} vs {list(b.shape)})")
            continue
        if a.dtype == b.dtype and torch.equal(a, b):
            identical += 1
            after_fp16 += 1
            continue
        if a.is_floating_point():
            diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            max_diff = max(max_diff, diff)
            if torch.equal(a.float(), b.to(torch.float16).float()):
                after_fp16 += 1
                continue
        differing.append(name)
    compared = len(set(ours) & set(reference))
    return {
        "tensors": compared,
        "identical": identical,
        "equal_after_rounding_the_public_weights_to_fp16": after_fp16,
        "max_abs_diff": max_diff,
        "differing": differing[:50],
        "missing": missing[:50],
        "extra": extra[:50],
        "equal": not differing and not missing and not extra and identical == compared,
    }


def compare_with_public(base_dir, vision: str | None = None, text: str | None = None, write: bool = True) -> dict:
    """Compare the backbones of the DETRIS folder `base_dir` with the public checkpoints (Hub ids or local folders;
    default: those of the same shape) and, with `write`, record the result in its `backbone_provenance.json`."""
    import torch
    from transformers import CLIPTextModelWithProjection, Dinov2WithRegistersModel

    from .modeling_detris import DetrisForReferringSegmentation

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise ValueError(f"--base {str(base_dir)!r} is not a model folder (no config.json); expected a DETRIS folder such "
                         "as the base written by `detris convert --split-adapters`")
    model = DetrisForReferringSegmentation.from_pretrained(str(base_dir))
    ours = backbone_tensors(model)
    references = {"vision": vision or public_vision_id(model.config), "text": text or public_text_id(model.config)}
    results = {}
    for role, loader in (("vision", Dinov2WithRegistersModel), ("text", CLIPTextModelWithProjection)):
        reference = references[role]
        if reference is None:
            raise ValueError(
                f"no public {role} checkpoint has the shape of {base_dir}'s {role} backbone; pass --{role} ID_OR_DIR"
            )
        public = loader.from_pretrained(reference, dtype=torch.float32).state_dict()  # fp16 files compare by value
        results[role] = {"reference": reference, **compare_tensors(ours[role], public)}
        del public
    if write:
        path = base_dir / PROVENANCE_FILE
        record = json.loads(path.read_text()) if path.is_file() else make_provenance(model, [])
        today = datetime.date.today().isoformat()
        for role, result in results.items():
            entry = record.setdefault(role, {})
            entry["equal_to_public"] = result["equal"]
            entry["comparison"] = {"date": today, **result}
        path.write_text(json.dumps(record, indent=2) + "\n")
    return results


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detris provenance", description="compare a DETRIS base folder's frozen backbones with the public checkpoints"
    )
    parser.add_argument("--base", required=True, help="a DETRIS model folder (e.g. the base written by --split-adapters)")
    parser.add_argument("--vision", default=None, help="DINOv2-with-registers Hub id or folder (default: by shape)")
    parser.add_argument("--text", default=None, help="CLIP Hub id or folder (default: openai/clip-vit-base-patch16)")
    parser.add_argument("--no-write", action="store_true", help=f"do not record the result in {PROVENANCE_FILE}")
    return parser


def main(argv=None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        results = compare_with_public(args.base, args.vision, args.text, write=not args.no_write)
    except (ValueError, OSError) as error:  # a bad folder or an unreachable reference: one line, exit code 2
        print(f"detris provenance: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    for role, result in results.items():
        verdict = "bit-identical" if result["equal"] else "DIFFERENT"
        print(
            f"{role}: {verdict} to {result['reference']}: {result['identical']}/{result['tensors']} tensors identical, "
            f"{result['equal_after_rounding_the_public_weights_to_fp16']} equal after rounding the public weights to "
            f"fp16, max |diff| {result['max_abs_diff']:.3g}"
            + (f"; differing: {', '.join(result['differing'][:5])}" if result["differing"] else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
