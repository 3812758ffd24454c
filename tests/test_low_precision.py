"""bf16 / fp16 DETRIS on the CPU: a model loaded in bf16 runs end to end in bf16 (processor -> model -> post-processing),
and on CPUs without native bf16 its matmuls and convolutions accumulate in fp32 the way native hardware does
(the low-precision section of modeling_detris.modeling_detris) instead of running torch's scalar reference kernels."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.bench_model import preset_config
from benchmarks.harness import make_inputs
from modeling_detris import DetrisForReferringSegmentation
from modeling_detris.modeling_detris import (
    WidenLowPrecisionOps,
    low_precision_emulation,
    native_low_precision_cpu,
    needs_low_precision_emulation,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_fp32():
    torch.manual_seed(0)
    return DetrisForReferringSegmentation(preset_config("tiny")).eval()


def test_widened_ops_compute_like_native_low_precision():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=generator).bfloat16()
    weight = torch.randn(32, 64, generator=generator).bfloat16()
    image = torch.randn(2, 8, 9, 9, generator=generator).bfloat16()
    kernel = torch.randn(4, 8, 3, 3, generator=generator).bfloat16()
    with WidenLowPrecisionOps():
        linear = F.linear(x, weight)
        product = x @ weight.T
        conv = F.conv2d(image, kernel, padding=1)
        untouched = F.linear(x.float(), weight.float())  # fp32 inputs pass through unchanged
    assert linear.dtype == product.dtype == conv.dtype == torch.bfloat16 and untouched.dtype == torch.float32
    # bf16 inputs, fp32 accumulation, one rounding of the output: exactly this
    assert torch.equal(linear, F.linear(x.float(), weight.float()).bfloat16())
    assert torch.equal(product, (x.float() @ weight.float().T).bfloat16())
    assert torch.equal(conv, F.conv2d(image.float(), kernel.float(), padding=1).bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16), WidenLowPrecisionOps():
        autocast = F.linear(x.float(), weight.float())  # autocast semantics: inputs rounded to bf16, output bf16
    assert autocast.dtype == torch.bfloat16 and torch.equal(autocast, linear)


def test_emulation_only_where_needed():
    cpu = torch.device("cpu")
    assert not needs_low_precision_emulation(cpu, torch.float32)
    assert needs_low_precision_emulation(cpu, torch.bfloat16) == (not native_low_precision_cpu(torch.bfloat16))
    assert not needs_low_precision_emulation(torch.device("meta"), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert needs_low_precision_emulation(cpu, torch.float32) == (not native_low_precision_cpu(torch.bfloat16))
    context = low_precision_emulation(cpu, torch.float32)
    assert not isinstance(context, WidenLowPrecisionOps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_end_to_end_from_the_processor(tiny_fp32, dtype):
    """Processor (float32 pixels) -> model loaded in bf16 / fp16 -> post-processing, against fp32."""
    import numpy as np

    from processing_detris import DetrisProcessor

    config = tiny_fp32.config
    processor = DetrisProcessor.from_model_config(config)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), rng.integers(0, 256, (90, 50, 3), dtype=np.uint8)]
    inputs = processor(images=images, text=["the red one", "left"], return_tensors="pt")
    assert inputs["pixel_values"].dtype == torch.float32
    model = DetrisForReferringSegmentation(config).eval()
    model.load_state_dict(tiny_fp32.state_dict())
    model = model.to(dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {dtype}  # BatchNorm statistics too
    with torch.inference_mode():
        low = model(**inputs)
        ref = tiny_fp32(**inputs)
    for name in ("logits", "text_embeds", "word_features", "neck_output", "decoder_output"):
        assert getattr(low, name).dtype == dtype, name
    scale = ref.logits.abs().max()
    assert (low.logits.float() - ref.logits).abs().max() <= 0.05 * scale
    masks = processor.post_process_referring_segmentation(low.logits, inputs["original_sizes"])
    assert [tuple(m.shape) for m in masks] == [(60, 80), (90, 50)] and all(m.dtype == torch.bool for m in masks)


def test_bf16_autocast_training_step_on_cpu(tiny_fp32):
    config = tiny_fp32.config
    model = DetrisForReferringSegmentation(config)
    model.load_state_dict(tiny_fp32.state_dict())
    model.train()
    pixel_values, input_ids, labels = make_inputs(config, 2, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=pixel_values, input_ids=input_ids, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.vision_model.embeddings.parameters())  # the backbone stays frozen
