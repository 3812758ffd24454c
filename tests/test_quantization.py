"""The fast CPU inference path (`modeling_detris.quantization_detris.optimize_for_cpu`): the mode chosen by the CPU's
features, what each mode changes, reloading, and mask parity with fp32 on the golden inputs."""

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModel

from modeling_detris import DetrisForReferringSegmentation
from modeling_detris.quantization_detris import cpu_fast_path, cpu_isa, int8_linear_names, optimize_for_cpu

from conftest import tiny_config, tiny_inputs

MASK_IOU = 0.98  # the bar for a fast path: masks agree with the fp32 masks at IoU >= 0.98


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return DetrisForReferringSegmentation(tiny_config()).eval()


def test_auto_mode_follows_the_cpu_features():
    none = dict(avx512_vnni=False, avx_vnni=False, avx512_bf16=False, amx_bf16=False, amx_int8=False, onednn_bf16=False)
    assert cpu_fast_path({**none, "amx_bf16": True, "avx512_vnni": True, "onednn_bf16": True}) == "bf16"
    assert cpu_fast_path({**none, "avx512_bf16": True, "avx512_vnni": True, "onednn_bf16": True}) == "bf16"
    assert cpu_fast_path({**none, "avx512_vnni": True}) == "int8"  # an Intel Xeon without bf16 units
    assert cpu_fast_path({**none, "avx_vnni": True}) == "int8"
    assert cpu_fast_path(none) == "fp32"  # AVX2 only: bf16 would be emulated, int8 unmeasured
    # torch's oneDNN does not run bf16 natively although the flag is there: no bf16
    assert cpu_fast_path({**none, "amx_bf16": True, "avx512_vnni": True}) == "int8"
    assert set(cpu_isa()) == {"avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "onednn_bf16"}
    assert cpu_fast_path() in ("bf16", "int8", "fp32")


def test_int8_quantises_only_the_backbone_linears(one_thread):
    model = _tiny_model()
    config = model.config
    names = int8_linear_names(model)
    vision_layers, text_layers = config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers
    # 4 attention projections + fc1 + fc2 per block, in both backbones; no adapter, neck, decoder or projector layer
    assert len(names) == 6 * (vision_layers + text_layers)
    assert all(n.startswith(("vision_model.", "text_model.")) and "dense_aligner" not in n and "text_adapter" not in n for n in names)
    pixel_values, input_ids, _ = tiny_inputs(config)
    with torch.inference_mode():
        reference = model(pixel_values=pixel_values, input_ids=input_ids).logits
    optimize_for_cpu(model, "int8")
    assert model.cpu_inference_mode == "int8"
    modules = dict(model.named_modules())
    quantized = {n for n, m in modules.items() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)}
    assert quantized == set(names)
    still_float = [n for n, m in modules.items() if type(m) is nn.Linear]
    assert any(".mlp.dense_aligner." in n for n in still_float) and any(n.startswith("decoder.") for n in still_float)
    assert modules[names[0]].weight().qscheme() == torch.per_channel_affine  # one scale per output channel
    with torch.inference_mode():
        logits = model(pixel_values=pixel_values, input_ids=input_ids).logits
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    assert 0 < (logits - reference).abs().max() < 0.5 * reference.abs().max()


def test_bf16_mode_saves_and_reloads(tmp_path, one_thread):
    model = _tiny_model()
    model.save_pretrained(tmp_path / "fp32")
    loaded = optimize_for_cpu(AutoModel.from_pretrained(tmp_path / "fp32"), "bf16")
    assert loaded.cpu_inference_mode == "bf16" and {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    pixel_values, input_ids, _ = tiny_inputs(model.config)
    with torch.inference_mode():
        logits = loaded(pixel_values=pixel_values, input_ids=input_ids).logits
    loaded.save_pretrained(tmp_path / "bf16")
    again = AutoModel.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        assert torch.equal(again(pixel_values=pixel_values, input_ids=input_ids).logits, logits)


def test_fp32_mode_changes_nothing_and_bad_modes_are_refused():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert optimize_for_cpu(model, "fp32") is model and model.cpu_inference_mode == "fp32"
    assert all(torch.equal(before[k], v) and v.is_contiguous() for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="'fp8'"):
        optimize_for_cpu(model, "fp8")
    with pytest.raises(ValueError, match="fp32 model"):
        optimize_for_cpu(_tiny_model().to(torch.bfloat16), "int8")


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_fast_path_masks_match_fp32_on_the_golden_inputs(mode, converted_base_dir, golden_outputs, golden_pixel_values):
    """DETRIS-B (the converted stand-in checkpoint) loaded with `from_pretrained`, then `optimize_for_cpu`; the masks
    post-processed from its logits against those from the fp32 logits (ours match the official fp32 to 1e-4, see
    test_golden_parity), at the identity letterbox and for a 4:3 image."""
    from transformers import AutoProcessor

    import processing_detris  # noqa: F401  (registers the processor)

    model = optimize_for_cpu(AutoModel.from_pretrained(converted_base_dir), mode)
    processor = AutoProcessor.from_pretrained(converted_base_dir)
    with torch.inference_mode():
        logits = model(pixel_values=golden_pixel_values, input_ids=torch.from_numpy(golden_outputs["input_ids"])).logits
    reference = torch.from_numpy(golden_outputs["logits"])
    sizes = [(448, 448), (480, 640)]
    fast = processor.post_process_referring_segmentation(logits.float(), sizes)
    fp32 = processor.post_process_referring_segmentation(reference, sizes)
    ious = [float((a & b).sum() / (a | b).sum()) for a, b in zip(fast, fp32)]
    diff = (logits.float() - reference).abs()
    print(f"\n[{mode}] logits max abs diff {diff.max():.3f}, mean {diff.mean():.4f}; mask IoU with fp32 {ious}")
    assert min(ious) >= MASK_IOU, ious
    assert 0 < float(diff.mean()) < 0.2 and np.isfinite(float(diff.max()))


def test_int8_finds_the_backbones_under_a_peft_wrapper(one_thread):
    from peft import get_peft_model

    from modeling_detris import DetrisAdapterConfig

    torch.manual_seed(0)
    base = DetrisForReferringSegmentation(tiny_config(adapters_in_model=False)).eval()
    plain = len(int8_linear_names(base))
    model = get_peft_model(base, DetrisAdapterConfig.from_model_config(base.config)).eval()
    names = int8_linear_names(model)
    assert len(names) == plain and all(n.startswith("base_model.model.") for n in names)
    pixel_values, input_ids, _ = tiny_inputs(base.config)
    optimize_for_cpu(model, "int8")
    with torch.inference_mode():
        assert torch.isfinite(model(pixel_values=pixel_values, input_ids=input_ids).logits).all()
