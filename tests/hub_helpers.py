"""Shared helpers of the tests/test_hub_*.py files: a tiny DETRIS whose text tower uses the CLIP vocabulary (so the
real DetrisProcessor tokenizer fits it), saved with its processor."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conftest import tiny_config

CLIP_TINY_TEXT = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=24,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
)


def tiny_clip_config(**overrides):
    return tiny_config(text_config=dict(CLIP_TINY_TEXT), **overrides)


def save_tiny_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised tiny DETRIS (56 px, word_len 7) with non-trivial BatchNorm statistics, plus its
    processor, saved in the transformers layout."""
    from modeling_detris import DetrisForReferringSegmentation
    from processing_detris import DetrisImageProcessor, DetrisProcessor

    torch.manual_seed(seed)
    config = tiny_clip_config(**overrides)
    model = DetrisForReferringSegmentation(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    model.save_pretrained(folder)
    size = {"height": config.input_size, "width": config.input_size}
    DetrisProcessor(image_processor=DetrisImageProcessor(size=size), word_len=config.word_len).save_pretrained(folder)
    return folder


def write_test_image(path: Path, width: int = 83, height: int = 61, seed: int = 0) -> Path:
    rng = np.random.RandomState(seed)
    pixels = rng.randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    pixels[10:40, 20:60] = (220, 30, 30)
    Image.fromarray(pixels).save(path)
    return path
