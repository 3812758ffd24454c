"""Faithfulness: the official-layout stand-in checkpoint, converted with `detris convert` and loaded with
`AutoModel`, reproduces the official code's outputs (tests/fixtures/golden, made by the official implementation)."""

import numpy as np
import pytest
import torch
from transformers import AutoModel

from modeling_detris import DetrisForReferringSegmentation

TOLERANCE = 1e-4  # a faithful fp32 implementation lands at about 2e-5; every known mistake moves logits by > 0.1


@pytest.fixture(scope="module")
def converted_model(converted_base_dir):
    model = AutoModel.from_pretrained(converted_base_dir).eval()
    assert type(model) is DetrisForReferringSegmentation
    return model


def _capture(model):
    captured = {}

    def keep(name):
        def hook(module, args, output):
            captured[name] = output

        return hook

    layers = model.vision_model.encoder.layer
    handles = [
        layers[1].mlp.detris_dense_aligner["default"].register_forward_hook(keep("dense_aligner_block1_output")),
        layers[11].mlp.detris_dense_aligner["default"].register_forward_hook(keep("dense_aligner_block11_output")),
        layers[1].register_forward_hook(keep("vision_block1_output")),
        layers[11].register_forward_hook(keep("vision_block11_output")),
        model.text_model.text_model.encoder.layers[1].mlp.detris_text_adapter["default"].register_forward_hook(
            keep("text_adapter_layer1_output")
        ),
    ]
    return captured, handles


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_converted_checkpoint_matches_official_outputs(converted_model, golden_outputs, golden_pixel_values, attn_implementation):
    model = converted_model
    model.set_attn_implementation(attn_implementation)
    input_ids = torch.from_numpy(golden_outputs["input_ids"])
    captured, handles = _capture(model)
    try:
        with torch.no_grad():
            out = model(pixel_values=golden_pixel_values, input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    ours = {
        "logits": out.logits,
        "text_state": out.text_embeds,
        "text_tokens": out.word_features,
        "vision_feature_0": out.vision_features[0],
        "vision_feature_1": out.vision_features[1],
        "vision_feature_2": out.vision_features[2],
        "neck": out.neck_output,
        "decoder_output": out.decoder_output,
        **captured,
    }
    report = {}
    for name, value in ours.items():
        golden = golden_outputs[name]
        value = value.detach().numpy()[tuple(slice(0, n) for n in golden.shape)]
        report[name] = float(np.abs(value - golden).max())
    print(f"\n[{attn_implementation}] max abs diff vs official: " + ", ".join(f"{k} {v:.2e}" for k, v in report.items()))
    assert all(v <= TOLERANCE for v in report.values()), report


def test_converted_folder_holds_processor_and_word_len(converted_base_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(converted_base_dir)
    model_config = AutoModel.from_pretrained(converted_base_dir).config
    encoded = processor(text=["the man on the left"], return_tensors="pt")
    assert encoded["input_ids"].shape == (1, model_config.word_len) == (1, 17)
