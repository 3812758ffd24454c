"""Convert an official DETRIS checkpoint (`.pth`) into a transformers folder (config + safetensors).

The official release stores `{"state_dict": {"module." + name: tensor}, ...}` (saved from DDP); raw state dicts and
names without `module.` are accepted too. Every official tensor is mapped (docs/architecture.md lists the key layout); the conversion
refuses, listing the names, if an official tensor is left unused or a model tensor is left unfilled, or if a shape
does not match the chosen variant.

    detris convert --checkpoint base_refcoco.pth --variant base --output detris-base-refcoco

A release (every file carries the same frozen DINOv2 and CLIP weights) splits into one base and one small PEFT
adapter folder per checkpoint (adapters + head), after checking that the frozen tensors are bit-identical:

    detris convert --checkpoint base_refcoco.pth --checkpoint base_refcocog_u.pth --variant base \
        --split-adapters --output detris-base-release     # -> base/, refcoco/, refcocog-umd/
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from configuration_detris.folders import new_staging, overlap, publish, staging_path

if TYPE_CHECKING:  # torch and the config are imported where they are used, so `detris convert --help` stays fast
    import torch

    from configuration_detris import DetrisConfig
from configuration_detris.release import (
    DATASET_FOLDER_NAMES,
    DEFAULT_WORD_LEN,
    WORD_LEN,
    canonical_dataset,
    dataset_from_checkpoint_name,
)

RELEASE_BASE = "../base"  # an adapter folder's base_model_name_or_path in a split release

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


def resolve_word_len(checkpoint_path, word_len: int | None = None, dataset: str | None = None,
                     default: int | None = None) -> tuple[int, str]:
    """`word_len` and a sentence saying where it came from. Nothing in a checkpoint reveals it (17, or 22 for G-Ref
    umd), so it comes from `word_len`, else `dataset`, else the official file name, else `default` (a `--config`'s
    value), else 17."""
    if word_len is not None:
        return int(word_len), f"word_len {word_len} (given)"
    if dataset is not None:
        key = canonical_dataset(dataset)
        return WORD_LEN[key], f"word_len {WORD_LEN[key]} (dataset {key})"
    from_name = dataset_from_checkpoint_name(checkpoint_path) if checkpoint_path else None
    if from_name is not None:
        value = WORD_LEN[from_name]
        return value, f"word_len {value} (dataset {from_name}, from the file name {Path(checkpoint_path).name})"
    if default is not None:
        return int(default), f"word_len {default} (from --config)"
    return DEFAULT_WORD_LEN, f"word_len {DEFAULT_WORD_LEN} (default; pass --word-len 22 or --dataset refcocog-umd for a G-Ref umd checkpoint)"


def load_official_state_dict(path) -> dict[str, torch.Tensor]:
    """Read an official checkpoint safely (`weights_only=True`) and strip the DDP `module.` prefix. A file that is not
    a plain PyTorch checkpoint of tensors (another format, truncated, or pickling code) is refused with a `ValueError`."""
    import torch  # here, not at the top: `detris convert --help` needs none of it

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        if Path(path).is_file() and Path(path).stat().st_size == 0:
            raise ValueError(f"{path} is empty (0 bytes); expected an official DETRIS .pth file") from None
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        # `from None`: torch's own message suggests weights_only=False, which would run any code in the file
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint of tensors ({reason}); expected an official "
            "DETRIS .pth file (read with weights_only=True: files that pickle code are refused)"
        ) from None
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
        mlp = f"{prefix}mlp."
        if rest.startswith("attn.in_proj_"):
            leaf = rest.rsplit("_", 1)[-1]
            return _split_qkv(f"{prefix}self_attn.", leaf, config.text_config.hidden_size)
        for old, new in (("attn.out_proj.", f"{prefix}self_attn.out_proj."), ("ln_1.", f"{prefix}layer_norm1."),
                         ("ln_2.", f"{prefix}layer_norm2."), ("mlp.c_fc.", f"{mlp}fc1."), ("mlp.c_proj.", f"{mlp}fc2.")):
            if rest.startswith(old):
                return [(new + rest[len(old):], None, False)]
        if rest.startswith("adapter."):
            return [(f"{prefix}mlp.text_adapter.{_adapter_name(rest[len('adapter.'):])}", None, False)]
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
        mlp = f"{prefix}mlp."
        if rest.startswith("attn.qkv."):
            return _split_qkv(f"{prefix}attention.", rest.rsplit(".", 1)[-1], config.vision_config.hidden_size)
        for old, new in (("attn.proj.", f"{prefix}attention.o_proj."), ("norm1.", f"{prefix}norm1."),
                         ("norm2.", f"{prefix}norm2."), ("ls1.gamma", f"{prefix}layer_scale1.lambda1"),
                         ("ls2.gamma", f"{prefix}layer_scale2.lambda1"), ("mlp.", mlp)):
            if rest.startswith(old):
                return [(new + rest[len(old):], None, False)]
        if rest.startswith("adapter."):
            return [(f"{prefix}mlp.dense_aligner.{_adapter_name(rest[len('adapter.'):])}", None, False)]
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


def load_config(config_or_path, variant: str = "base", word_len: int | None = None) -> DetrisConfig:
    """The DetrisConfig to convert into: a `DetrisConfig`, a `config.json` file or a model folder, else the preset
    `variant`; `word_len` (when given) replaces the config's."""
    from configuration_detris import DetrisConfig

    if config_or_path is None:
        config = DetrisConfig.from_preset(variant)
    elif isinstance(config_or_path, DetrisConfig):
        config = DetrisConfig.from_dict(config_or_path.to_dict())
    else:
        path = Path(config_or_path)
        if not path.exists():
            raise ValueError(f"--config {str(path)!r} does not exist; expected a DETRIS config.json or a model folder")
        try:
            config = DetrisConfig.from_pretrained(str(path)) if path.is_dir() else DetrisConfig.from_json_file(str(path))
        except (OSError, ValueError) as error:  # not JSON, not UTF-8, no config.json in the folder, a bad value
            raise ValueError(f"--config {str(path)!r} is not a readable DETRIS config ({' '.join(str(error).split())}); "
                             "expected a DETRIS config.json or a model folder holding one") from None
    if word_len is not None:
        config.word_len = int(word_len)
    config.adapters_in_model = True
    return config


def convert_checkpoint(checkpoint, variant: str = "base", word_len: int = 17, config=None, official=None):
    """Return a `DetrisForReferringSegmentation` holding the weights of an official checkpoint file. `config`
    (a `DetrisConfig`, a config.json or a folder) replaces the preset `variant` for a non-preset architecture;
    `official` is the already loaded state dict of `checkpoint`, if any."""
    config = load_config(config, variant, word_len)
    model = build_model(config)
    official = load_official_state_dict(checkpoint) if official is None else official
    converted = convert_state_dict(official, config, model.state_dict())
    model.load_state_dict(converted, strict=True)
    model.freeze_backbones()
    return model.eval()


# ----- a release: one base + one adapter folder per checkpoint --------------------------------------------------
CONVERSION_FILE = "conversion.json"


def is_frozen_official_key(name: str) -> bool:
    """The official tensors of the frozen backbones: DINOv2 and CLIP text, adapters excluded."""
    return name.startswith(("dinov2.", "txt_backbone.")) and ".adapter." not in name


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def differing_frozen_tensors(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> list[str]:
    """Official names of the frozen backbone tensors that are not bit-for-bit identical in the two state dicts
    (different values, dtype or shape, or present in only one)."""
    names = sorted({k for k in reference if is_frozen_official_key(k)} | {k for k in other if is_frozen_official_key(k)})
    differing = []
    for name in names:
        if name not in reference or name not in other:
            differing.append(f"{name} (only in {'the first' if name in reference else 'this'} checkpoint)")
        elif not _same_bits(reference[name], other[name]):
            a, b = reference[name], other[name]
            if a.dtype != b.dtype or a.shape != b.shape:
                differing.append(f"{name} ({a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)})")
            else:
                differing.append(f"{name} (max |diff| {(a.double() - b.double()).abs().max().item():.3g})")
    return differing


def _per_checkpoint(name: str, values, checkpoints) -> list:
    if not values:
        return [None] * len(checkpoints)
    if len(values) != len(checkpoints):
        raise ValueError(
            f"{name} was given {len(values)} time(s) for {len(checkpoints)} --checkpoint(s); expected it once per "
            "--checkpoint (in the same order) or not at all"
        )
    return list(values)


def check_sha256(path, expected: str) -> str:
    """The file's SHA-256 (hex); a `ValueError` naming both digests when it is not `expected` (a corrupt, truncated
    or different file), or when `expected` is not a SHA-256 hex digest."""
    from .provenance import file_sha256

    if not re.fullmatch(r"[0-9a-fA-F]{64}", expected or ""):
        raise ValueError(f"--sha256 {expected!r} is not a SHA-256 digest; expected 64 hexadecimal characters")
    digest = file_sha256(path)
    if digest != expected.lower():
        raise ValueError(f"{path}: SHA-256 is {digest}, expected {expected.lower()} (--sha256); the file is corrupt "
                         "or not the published checkpoint")
    return digest


def plan_checkpoints(checkpoints, word_lens=None, datasets=None, default_word_len: int | None = None,
                     sha256s=None) -> list[dict]:
    """Per checkpoint: its dataset (given, else from the official file name), `word_len` and where it came from,
    and the adapter folder name (named after the dataset, else the file name). With `sha256s` (one per checkpoint)
    each file's SHA-256 is checked before anything is loaded."""
    plans = []
    for path, word_len, dataset, sha256 in zip(
        checkpoints, _per_checkpoint("--word-len", word_lens, checkpoints), _per_checkpoint("--dataset", datasets, checkpoints),
        _per_checkpoint("--sha256", sha256s, checkpoints),
    ):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--checkpoint {str(path)!r} does not exist; expected an official DETRIS .pth file")
        digest = check_sha256(path, sha256) if sha256 is not None else None
        key = canonical_dataset(dataset) if dataset is not None else dataset_from_checkpoint_name(path)
        value, origin = resolve_word_len(path, word_len, dataset, default_word_len)
        folder = DATASET_FOLDER_NAMES.get(key) or re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-") or "adapter"
        plans.append({"path": path, "dataset": key, "word_len": value, "word_len_origin": origin, "folder": folder,
                      "sha256": digest})
    seen = {}
    for plan in plans:
        if plan["folder"] in seen:
            raise ValueError(
                f"{seen[plan['folder']].name} and {plan['path'].name} would both become the adapter folder "
                f"{plan['folder']!r}; expected one checkpoint per dataset (pass --dataset once per --checkpoint)"
            )
        if plan["folder"] == "base":
            raise ValueError(f"{plan['path'].name} would become the adapter folder 'base', which is the base model's")
        seen[plan["folder"]] = plan["path"]
    return plans


def _source_record(plan: dict, variant: str | None) -> dict:
    from .provenance import file_sha256

    path = plan["path"]
    return {
        "file": path.name,
        "sha256": plan.get("sha256") or file_sha256(path),
        "bytes": path.stat().st_size,
        "variant": variant,
        "dataset": plan["dataset"],
        "word_len": plan["word_len"],
        "word_len_origin": plan["word_len_origin"],
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def check_output(output, checkpoints, overwrite: bool = False) -> None:
    """Refuse, before any work, an `--output` that would destroy data: one that is, or contains, an input checkpoint
    (always), a file, or a non-empty folder unless `overwrite` is set. The staging folder beside it
    (`configuration_detris.folders.staging_path`) is checked the same way."""
    output = Path(output).resolve()
    for target in (output, staging_path(output), staging_path(output, os.getpid())):
        for checkpoint in checkpoints:
            if overlap(target, checkpoint) in ("is", "contains"):
                raise ValueError(
                    f"--output {str(target)!r} is or contains the input checkpoint {str(checkpoint)!r}; choose a folder "
                    "outside the checkpoints (the output folder is replaced as a whole)"
                )
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a file; expected a folder (new, empty, or with --overwrite)")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"--output {str(output)!r} is not empty; pass --overwrite to replace it, or choose a new folder")


def convert_release(checkpoints, output, variant: str = "base", config=None, word_lens=None, datasets=None,
                    save_extras=None, log=print, overwrite: bool = False, sha256s=None) -> dict:
    """Split official checkpoints that share their frozen backbones into `output/base` (backbones + the first
    checkpoint's head, `adapters_in_model=False`, with `backbone_provenance.json`) and one PEFT adapter folder per
    checkpoint, `output/<dataset>` (adapters + head, its processor with its own `word_len`, `conversion.json`).
    Refuses, naming the tensors, when a checkpoint's frozen tensors are not bit-identical to the first one's.
    Written atomically; an existing non-empty `output` is replaced only with `overwrite`; `sha256s` (one per
    checkpoint) are checked before anything is loaded. Returns
    {"base": path, "adapters": {folder: path}}."""
    from .peft_detris import split_standalone_model
    from .provenance import PROVENANCE_FILE, make_provenance

    output = Path(output)
    check_output(output, checkpoints, overwrite)
    default_word_len = load_config(config, variant).word_len if config is not None else None
    plans = plan_checkpoints(checkpoints, word_lens, datasets, default_word_len, sha256s)
    staging = new_staging(output)
    try:
        reference, sources, standalone = None, [], None
        from transformers.utils import logging

        progress = logging.tqdm(plans, desc="checkpoints", unit="checkpoint", disable=len(plans) < 2)
        for index, plan in enumerate(progress):
            log(f"converting {plan['path']} as DETRIS-{variant if config is None else 'custom'} with {plan['word_len_origin']}")
            official = load_official_state_dict(plan["path"])
            frozen = {k: v for k, v in official.items() if is_frozen_official_key(k)}
            if reference is None:
                reference = frozen
            else:
                differing = differing_frozen_tensors(reference, frozen)
                if differing:
                    raise ValueError(
                        f"{plan['path'].name} does not share its frozen backbones with {plans[0]['path'].name}: "
                        f"{len(differing)} tensor(s) differ bit for bit:\n  " + "\n  ".join(differing[:20])
                        + "\nexpected identical dinov2.* / txt_backbone.* tensors (checkpoints of one release); "
                        "convert them separately (without --split-adapters) or into separate releases"
                    )
            standalone = convert_checkpoint(plan["path"], variant, plan["word_len"], config, official=official)
            del official
            base_dir = staging / "base" if index == 0 else None
            # relative to the adapter folder, so that the release can be moved or copied as a whole
            peft_model = split_standalone_model(standalone, base_dir, base_model_name_or_path=RELEASE_BASE)
            source = _source_record(plan, variant if config is None else None)
            sources.append(source)
            if base_dir is not None:
                if save_extras is not None:
                    save_extras(base_dir, peft_model.base_model.model.config)
            adapter_dir = staging / plan["folder"]
            with warnings.catch_warnings():  # PEFT looks for the base's config, which is only published at the end
                warnings.filterwarnings("ignore", message="Could not find a config file")
                peft_model.save_pretrained(str(adapter_dir))
            (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's stub; `detris card` / `push` write ours
            if save_extras is not None:
                save_extras(adapter_dir, standalone.config)
            _write_json(adapter_dir / CONVERSION_FILE, {**source, "kind": "adapter", "base": RELEASE_BASE})
            log(f"  adapter {plan['folder']}/ (dataset {plan['dataset']}, word_len {plan['word_len']})")
            del peft_model
        base_sources = [{k: s[k] for k in ("file", "sha256", "bytes", "dataset")} for s in sources]
        _write_json(staging / "base" / PROVENANCE_FILE, make_provenance(standalone, base_sources, variant if config is None else None))
        _write_json(staging / "base" / CONVERSION_FILE, {
            "kind": "base", "variant": variant if config is None else None, "checkpoints": base_sources,
            "head": f"the head of {sources[0]['file']} (each adapter carries its own)",
            "adapters": [plan["folder"] for plan in plans],
        })
        publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote {output}/base and {len(plans)} adapter folder(s): {', '.join(p['folder'] for p in plans)}")
    return {"base": output / "base", "adapters": {p["folder"]: output / p["folder"] for p in plans}}


def convert_whole(checkpoint, output, variant: str = "base", config=None, word_len=None, dataset=None,
                  save_extras=None, log=print, overwrite: bool = False, sha256: str | None = None) -> Path:
    """Convert one checkpoint into one whole model folder (config, weights, `conversion.json`; the processor through
    `save_extras`), written atomically; an existing non-empty `output` is replaced only with `overwrite`; `sha256`
    (when given) is checked before the file is loaded."""
    output = Path(output)
    check_output(output, [checkpoint], overwrite)
    default_word_len = load_config(config, variant).word_len if config is not None else None
    (plan,) = plan_checkpoints([checkpoint], [word_len] if word_len is not None else None,
                               [dataset] if dataset is not None else None, default_word_len,
                               [sha256] if sha256 is not None else None)
    log(f"converting {checkpoint} as DETRIS-{variant if config is None else 'custom'} with {plan['word_len_origin']}")
    model = convert_checkpoint(checkpoint, variant, plan["word_len"], config)
    staging = new_staging(output)
    try:
        model.save_pretrained(staging)
        if save_extras is not None:
            save_extras(staging, model.config)
        _write_json(staging / CONVERSION_FILE, {**_source_record(plan, variant if config is None else None), "kind": "model"})
        publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote {output}")
    return output


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="detris convert", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, action="append",
                        help="official DETRIS .pth file (repeatable with --split-adapters)")
    parser.add_argument("--variant", default="base", choices=["base", "large", "large-mixed"])
    parser.add_argument("--config", default=None,
                        help="a DETRIS config.json (or model folder) for a non-preset architecture; replaces --variant")
    parser.add_argument("--output", required=True, help="output folder (written atomically; must be new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    parser.add_argument("--word-len", type=int, action="append", default=None,
                        help="text length (17, or 22 for G-Ref umd); once per --checkpoint")
    parser.add_argument("--dataset", action="append", default=None,
                        help=f"dataset the checkpoint was trained on, once per --checkpoint: {sorted(WORD_LEN)}")
    parser.add_argument("--sha256", action="append", default=None,
                        help="expected SHA-256 of the checkpoint, once per --checkpoint: a file that differs is refused "
                             "before it is loaded")
    parser.add_argument("--split-adapters", action="store_true",
                        help="write OUTPUT/base (frozen backbones) + one PEFT adapter folder per checkpoint")
    return parser


def main(argv=None, save_extras=None) -> int:
    """`detris convert`. `save_extras(output_dir, config)` may write more files (the CLI passes the processor). A
    user mistake (a bad argument, a checkpoint that does not fit, an unsafe `--output`) ends in one line on stderr
    and exit code 2; nothing is written."""
    args = build_arg_parser().parse_args(argv)
    try:
        return run(args, save_extras)
    except ValueError as error:
        message = " | ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"detris convert: error: {message}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, save_extras=None) -> int:
    """Run parsed `detris convert` arguments (raises `ValueError` on a user mistake)."""
    log = lambda message: tqdm.write(message, file=sys.stderr)  # noqa: E731  (keeps the progress bar below)
    if args.split_adapters:
        convert_release(args.checkpoint, args.output, args.variant, args.config, args.word_len, args.dataset,
                        save_extras=save_extras, log=log, overwrite=args.overwrite, sha256s=args.sha256)
        return 0
    if len(args.checkpoint) > 1:
        raise ValueError(
            f"{len(args.checkpoint)} --checkpoint files given without --split-adapters; expected one checkpoint, or "
            "--split-adapters to write one base and one adapter folder per checkpoint"
        )
    word_lens = _per_checkpoint("--word-len", args.word_len, args.checkpoint)
    datasets = _per_checkpoint("--dataset", args.dataset, args.checkpoint)
    sha256s = _per_checkpoint("--sha256", args.sha256, args.checkpoint)
    convert_whole(args.checkpoint[0], args.output, args.variant, args.config, word_lens[0], datasets[0],
                  save_extras=save_extras, log=log, overwrite=args.overwrite, sha256=sha256s[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
