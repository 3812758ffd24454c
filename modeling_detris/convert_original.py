"""Convert an official DETRIS checkpoint (`.pth`) into a transformers folder (config + safetensors).

The official release stores `{"state_dict": {"module." + name: tensor}, ...}` (saved from DDP); raw state dicts and
names without `module.` are accepted too. Every official tensor is mapped (ARCHITECTURE.md §5.4); the conversion
refuses, listing the names, if an official tensor is left unused or a model tensor is left unfilled, or if a shape
does not match the chosen variant.

    detris convert --checkpoint base_refcoco.pth --variant base --output detris-base-refcoco
"""

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from configuration_detris import DetrisConfig

WORD_LEN_BY_DATASET = {
    "refcoco": 17,
    "refcoco+": 17,
    "refcocog-google": 17,
    "refcocog-umd": 22,
    "mixed": 17,
}
DATASET_ALIASES = {
    "refcocog_u": "refcocog-umd",
    "refcocog-u": "refcocog-umd",
    "refcocog_umd": "refcocog-umd",
    "refcocog_g": "refcocog-google",
    "refcocog-g": "refcocog-google",
    "refcocog_google": "refcocog-google",
    "refcoco_plus": "refcoco+",
    "refcocoplus": "refcoco+",
    "refcoco_mixed": "mixed",
    "mix": "mixed",
}

_ADAPTER_RENAMES = [
    ("D_fc1.", "down_proj."),
    ("D_fc2.", "up_proj."),
    ("dense_branch1.", "dense_moc.branch1."),
    ("dense_branch2.0.", "dense_moc.branch2_reduce."),
    ("dense_branch2.1.", "dense_moc.branch2."),
    ("dense_branch3.0.", "dense_moc.branch3_reduce."),
    ("dense_branch3.1.", "dense_moc.branch3."),
    ("cross.multihead_attn.", "cross_attention.attn."),
    ("cross.", "cross_attention."),
]


def normalise_dataset_name(name: str) -> str:
    key = name.lower()
    key = DATASET_ALIASES.get(key, key)
    if key not in WORD_LEN_BY_DATASET:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(WORD_LEN_BY_DATASET)}")
    return key


def dataset_from_checkpoint_name(path) -> str | None:
    """The dataset an official release file is named after (`base_refcocog_u.pth` -> `refcocog-umd`), or None."""
    stem = Path(path).stem.lower()
    for token, dataset in (
        ("refcocog_u", "refcocog-umd"),
        ("refcocog_g", "refcocog-google"),
        ("refcoco+", "refcoco+"),
        ("mix", "mixed"),
        ("refcoco", "refcoco"),
    ):
        if token in stem:
            return dataset
    return None


def resolve_word_len(checkpoint_path, word_len: int | None = None, dataset: str | None = None) -> tuple[int, str]:
    """`word_len` and a sentence saying where it came from. Nothing in a checkpoint reveals it (17, or 22 for G-Ref
    umd), so it comes from `word_len`, else `dataset`, else the official file name, else the default 17."""
    if word_len is not None:
        return int(word_len), f"word_len {word_len} (given)"
    if dataset is not None:
        key = normalise_dataset_name(dataset)
        return WORD_LEN_BY_DATASET[key], f"word_len {WORD_LEN_BY_DATASET[key]} (dataset {key})"
    from_name = dataset_from_checkpoint_name(checkpoint_path) if checkpoint_path else None
    if from_name is not None:
        value = WORD_LEN_BY_DATASET[from_name]
        return value, f"word_len {value} (dataset {from_name}, from the file name {Path(checkpoint_path).name})"
    return 17, "word_len 17 (default; pass --word-len 22 or --dataset refcocog-umd for a G-Ref umd checkpoint)"


def load_official_state_dict(path) -> dict[str, torch.Tensor]:
    """Read an official checkpoint safely (`weights_only=True`) and strip the DDP `module.` prefix."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a DETRIS checkpoint: expected a state dict of tensors (or one under 'state_dict')")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def _adapter_name(rest: str) -> str:
    for old, new in _ADAPTER_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def map_official_key(name: str, config: DetrisConfig) -> list[tuple[str, slice | None, bool]]:
    """Our key(s) for one official key: a list of (new_name, row slice or None, transpose?)."""
    text = "text_model.text_model."
    m = re.fullmatch(r"txt_backbone\.transformer\.resblocks\.(\d+)\.(.+)", name)
    if m:
        index, rest = int(m.group(1)), m.group(2)
        prefix = f"{text}encoder.layers.{index}."
        adapted = index in config.text_adapter_layers
        mlp = f"{prefix}mlp.base_layer." if adapted else f"{prefix}mlp."
        if rest.startswith("attn.in_proj_"):
            leaf = rest.rsplit("_", 1)[-1]
            return _split_qkv(f"{prefix}self_attn.", leaf, config.text_config.hidden_size)
        for old, new in (("attn.out_proj.", f"{prefix}self_attn.out_proj."), ("ln_1.", f"{prefix}layer_norm1."),
                         ("ln_2.", f"{prefix}layer_norm2."), ("mlp.c_fc.", f"{mlp}fc1."), ("mlp.c_proj.", f"{mlp}fc2.")):
            if rest.startswith(old):
                return [(new + rest[len(old):], None, False)]
        if rest.startswith("adapter."):
            return [(f"{prefix}mlp.detris_text_adapter.default.{_adapter_name(rest[len('adapter.'):])}", None, False)]
    simple_text = {
        "txt_backbone.token_embedding.weight": (f"{text}embeddings.token_embedding.weight", False),
        "txt_backbone.positional_embedding": (f"{text}embeddings.position_embedding.weight", False),
        "txt_backbone.text_projection": ("text_model.text_projection.weight", True),
        "txt_backbone.logit_scale": ("logit_scale", False),
        "txt_backbone.ln_final.weight": (f"{text}final_layer_norm.weight", False),
        "txt_backbone.ln_final.bias": (f"{text}final_layer_norm.bias", False),
    }
    if name in simple_text:
        new, transpose = simple_text[name]
        return [(new, None, transpose)]

    m = re.fullmatch(r"dinov2\.blocks\.(\d+)\.(.+)", name)
    if m:
        index, rest = int(m.group(1)), m.group(2)
        prefix = f"vision_model.encoder.layer.{index}."
        mlp = f"{prefix}mlp.base_layer." if index in config.vision_adapter_layers else f"{prefix}mlp."
        if rest.startswith("attn.qkv."):
            return _split_qkv(f"{prefix}attention.", rest.rsplit(".", 1)[-1], config.vision_config.hidden_size)
        for old, new in (("attn.proj.", f"{prefix}attention.o_proj."), ("norm1.", f"{prefix}norm1."),
                         ("norm2.", f"{prefix}norm2."), ("ls1.gamma", f"{prefix}layer_scale1.lambda1"),
                         ("ls2.gamma", f"{prefix}layer_scale2.lambda1"), ("mlp.", mlp)):
            if rest.startswith(old):
                return [(new + rest[len(old):], None, False)]
        if rest.startswith("adapter."):
            return [(f"{prefix}mlp.detris_dense_aligner.default.{_adapter_name(rest[len('adapter.'):])}", None, False)]
    simple_vision = {
        "dinov2.cls_token": "vision_model.embeddings.cls_token",
        "dinov2.register_tokens": "vision_model.embeddings.register_tokens",
        "dinov2.mask_token": "vision_model.embeddings.mask_token",
        "dinov2.pos_embed": "vision_model.embeddings.position_embeddings",
        "dinov2.patch_embed.proj.weight": "vision_model.embeddings.patch_embeddings.projection.weight",
        "dinov2.patch_embed.proj.bias": "vision_model.embeddings.patch_embeddings.projection.bias",
        "dinov2.norm.weight": "vision_model.layernorm.weight",
        "dinov2.norm.bias": "vision_model.layernorm.bias",
    }
    if name in simple_vision:
        return [(simple_vision[name], None, False)]

    if name.startswith("neck."):
        rest = name[len("neck."):]
        rest = re.sub(r"^(fusion\d)\.multihead_attn\.", r"\1.", rest)
        rest = rest.replace("coordconv.0.conv1.", "coordconv.0.conv.")
        return [("neck." + rest, None, rest == "f5_proj.0.weight")]
    if name.startswith("decoder."):
        return [(name, None, False)]
    if name.startswith("proj."):
        return [("projector." + name[len("proj."):], None, False)]
    return []


def _split_qkv(prefix: str, leaf: str, hidden: int):
    names = ("q_proj", "k_proj", "v_proj")
    leaf = "weight" if leaf == "weight" else "bias"
    return [(f"{prefix}{names[i]}.{leaf}", slice(i * hidden, (i + 1) * hidden), False) for i in range(3)]


def convert_state_dict(official: dict[str, torch.Tensor], config: DetrisConfig, expected: dict[str, torch.Tensor]):
    """Map an official state dict onto our names; `expected` is the target model's state dict (for shapes).
    Raises `ValueError` listing unused official keys, unfilled model keys and shape mismatches."""
    converted, unused, mismatched = {}, [], []
    for name, tensor in official.items():
        targets = map_official_key(name, config)
        if not targets:
            unused.append(name)
            continue
        for new_name, rows, transpose in targets:
            value = tensor[rows] if rows is not None else tensor
            value = value.transpose(0, 1) if transpose else value
            if new_name not in expected:
                unused.append(name)
                continue
            if tuple(value.shape) != tuple(expected[new_name].shape):
                mismatched.append(f"{name} {list(tensor.shape)} -> {new_name} expects {list(expected[new_name].shape)}")
                continue
            converted[new_name] = value.to(expected[new_name].dtype).contiguous()
    unfilled = sorted(set(expected) - set(converted))
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) (wrong --variant?):\n  " + "\n  ".join(mismatched[:20]))
    if unused:
        problems.append(f"{len(unused)} official tensor(s) not used by this variant:\n  " + "\n  ".join(sorted(unused)[:20]))
    if unfilled:
        problems.append(f"{len(unfilled)} model tensor(s) not filled by the checkpoint:\n  " + "\n  ".join(unfilled[:20]))
    if problems:
        raise ValueError("the checkpoint does not match the DETRIS config: " + "\n".join(problems))
    return converted


def build_model(config: DetrisConfig):
    from transformers.initialization import no_init_weights

    from .modeling_detris import DetrisForReferringSegmentation

    with no_init_weights():
        return DetrisForReferringSegmentation(config)


def convert_checkpoint(checkpoint, variant: str = "base", word_len: int = 17):
    """Return a `DetrisForReferringSegmentation` holding the weights of an official checkpoint file."""
    config = DetrisConfig.from_preset(variant, word_len=word_len)
    model = build_model(config)
    official = load_official_state_dict(checkpoint)
    converted = convert_state_dict(official, config, model.state_dict())
    model.load_state_dict(converted, strict=True)
    model.freeze_backbones()
    return model.eval()


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="detris convert", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="official DETRIS .pth file")
    parser.add_argument("--variant", default="base", choices=["base", "large", "large-mixed"])
    parser.add_argument("--output", required=True, help="output folder (written atomically)")
    parser.add_argument("--word-len", type=int, default=None, help="text length (17, or 22 for G-Ref umd)")
    parser.add_argument("--dataset", default=None, help=f"dataset the checkpoint was trained on: {sorted(WORD_LEN_BY_DATASET)}")
    return parser


def main(argv=None, save_extras=None) -> int:
    """`detris convert`. `save_extras(output_dir, config)` may write more files (the CLI passes the processor)."""
    args = build_arg_parser().parse_args(argv)
    word_len, origin = resolve_word_len(args.checkpoint, args.word_len, args.dataset)
    print(f"converting {args.checkpoint} as DETRIS-{args.variant} with {origin}", file=sys.stderr)
    model = convert_checkpoint(args.checkpoint, args.variant, word_len)
    output = Path(args.output)
    staging = output.with_name(output.name + ".partial")
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    model.save_pretrained(staging)
    if save_extras is not None:
        save_extras(staging, model.config)
    if output.exists():
        import shutil

        shutil.rmtree(output)
    os.replace(staging, output)
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
