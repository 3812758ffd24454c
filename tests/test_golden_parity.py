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
            captured[name] = output[0] if isinstance(output, tuple) else output  # a vision block also returns its attention weights

        return hook

    layers = model.vision_model.encoder.layer
    handles = [
        layers[1].mlp.dense_aligner.register_forward_hook(keep("dense_aligner_block1_output")),
        layers[11].mlp.dense_aligner.register_forward_hook(keep("dense_aligner_block11_output")),
        layers[1].register_forward_hook(keep("vision_block1_output")),
        layers[11].register_forward_hook(keep("vision_block11_output")),
        model.text_model.text_model.encoder.layers[1].mlp.text_adapter.register_forward_hook(keep("text_adapter_layer1_output")),
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


# bf16: 8 mantissa bits, so every op output is rounded to ~0.4 % and the error accumulates over the 12 blocks, the
# adapters and the head. Measured on the golden inputs (stand-in weights, logits in [-6.3, 6.3], std 1.25): max abs
# diff to the official fp32 logits 0.18, mean 0.035. Tolerance: twice that, and the masks post-processed from the
# bf16 logits must agree with the fp32 masks to IoU >= 0.99.
BF16_LOGITS_MAX_ABS = 0.35
BF16_LOGITS_MEAN_ABS = 0.07
BF16_MASK_IOU = 0.99


def test_bf16_model_matches_official_fp32_outputs(converted_base_dir, golden_outputs, golden_pixel_values):
    from transformers import AutoProcessor

    import processing_detris  # noqa: F401  (registers the processor)

    model = AutoModel.from_pretrained(converted_base_dir, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    processor = AutoProcessor.from_pretrained(converted_base_dir)
    input_ids = torch.from_numpy(golden_outputs["input_ids"])
    with torch.inference_mode():
        out = model(pixel_values=golden_pixel_values, input_ids=input_ids)
    assert out.logits.dtype == torch.bfloat16
    reference = torch.from_numpy(golden_outputs["logits"])
    diff = (out.logits.float() - reference).abs()
    sizes = [(448, 448), (480, 640)]  # the identity letterbox and a 4:3 image
    bf16_masks = processor.post_process_referring_segmentation(out.logits, sizes)
    fp32_masks = processor.post_process_referring_segmentation(reference, sizes)
    ious = [float((a & b).sum() / (a | b).sum()) for a, b in zip(bf16_masks, fp32_masks)]
    print(f"\n[bf16] logits max abs diff {diff.max():.3f}, mean {diff.mean():.4f}; mask IoU with fp32 {ious}")
    assert diff.max() <= BF16_LOGITS_MAX_ABS and diff.mean() <= BF16_LOGITS_MEAN_ABS
    assert all(m.dtype == torch.bool for m in bf16_masks) and min(ious) >= BF16_MASK_IOU
