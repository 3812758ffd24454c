"""Tiny stand-ins for official DETRIS release files (`{"state_dict": {"module." + name: tensor}}`), for tests of the
release tooling (split into base + adapters, reproduce, fine-tune from converted weights) that do not need the
703 MB DETRIS-B stand-in.

The official key names are those of `keys_base.tsv` that a tiny configuration keeps (4 DINOv2 / CLIP layers with
adapters in blocks 1 and 3, 2 decoder layers); each tensor's shape is read off the model the converter builds, and its
values come from the official goldens' generator (`original_weights.make_state_dict`). Backbone tensors use
`backbone_seed`, adapters and head `seed`, so files with one `backbone_seed` share their frozen backbones bit for bit,
as the checkpoints of one official release do. The converter refuses any unused or unfilled tensor, so a successful
conversion also checks this helper.
"""

import json
from pathlib import Path

import torch

from conftest import GOLDEN
from hub_helpers import tiny_clip_config
from original_weights import make_state_dict, read_keys


def standin_config(**overrides):
    """A tiny DETRIS with the real CLIP vocabulary (so the real processor feeds it) and the official adapter blocks
    of its depth: vision and text adapters in blocks 1 and 3."""
    settings = dict(text_adapter_layers=[1, 3], vision_adapter_layers=[1, 3], adapter_init="official")
    settings.update(overrides)
    return tiny_clip_config(**settings)


def write_config(path: Path, config=None) -> Path:
    config = config or standin_config()
    path.write_text(json.dumps(config.to_dict(), indent=2))
    return path


def official_keys(config) -> list[tuple[str, tuple, str]]:
    """(official name, official shape, dtype) of every tensor an official checkpoint of `config` holds."""
    from modeling_detris import DetrisForReferringSegmentation
    from modeling_detris.convert_original import map_official_key

    config = type(config).from_dict(config.to_dict())
    config.adapters_in_model = True
    with torch.device("meta"):
        expected = DetrisForReferringSegmentation(config).state_dict()
    keys = []
    for name, _, dtype in read_keys(GOLDEN / "keys_base.tsv"):
        targets = map_official_key(name, config)
        if not targets or any(target not in expected for target, _, _ in targets):
            continue  # a layer the tiny configuration does not have
        target, rows, transpose = targets[0]
        shape = tuple(expected[target].shape)
        if rows is not None:
            shape = (shape[0] * len(targets),) + shape[1:]
        if transpose:
            shape = (shape[1], shape[0]) + shape[2:]
        keys.append((name, shape, dtype))
    return keys


def make_official_checkpoint(path: Path, config=None, seed: int = 1, backbone_seed: int = 0, prefix: bool = True) -> Path:
    """Write a tiny official-layout checkpoint to `path`; returns `path`."""
    from modeling_detris.convert_original import is_frozen_official_key

    keys = official_keys(config or standin_config())
    frozen = [k for k in keys if is_frozen_official_key(k[0])]
    trained = [k for k in keys if not is_frozen_official_key(k[0])]
    state = {**make_state_dict(frozen, seed=backbone_seed), **make_state_dict(trained, seed=seed)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 50, "state_dict": {("module." if prefix else "") + k: v for k, v in state.items()}}, path)
    return path
