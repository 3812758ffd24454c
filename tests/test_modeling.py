"""DETRIS model behaviour on a tiny configuration (fast); faithfulness to the official code is in test_golden_parity."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, CLIPTextConfig, CLIPTextModelWithProjection, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from conftest import tiny_config, tiny_inputs
from modeling_detris import DenseAligner, DetrisForReferringSegmentation, TextAdapter
from modeling_detris.modeling_detris import init_adapter_weights
from modeling_detris.peft_detris import is_adapter_key


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DetrisForReferringSegmentation(tiny_config()).eval()


def test_forward_shapes_and_loss(tiny_model):
    config = tiny_model.config
    pixel_values, input_ids, labels = tiny_inputs(config)
    out = tiny_model(pixel_values=pixel_values, input_ids=input_ids, labels=labels)
    grid = config.grid_size
    assert out.logits.shape == (2, 1, 4 * grid, 4 * grid)
    assert out.text_embeds.shape == (2, config.text_config.projection_dim)
    assert out.word_features.shape == (2, config.word_len, config.text_config.hidden_size)
    assert [f.shape for f in out.vision_features] == [(2, config.vision_config.hidden_size, grid, grid)] * 3
    target = F.interpolate(labels[:, None], size=out.logits.shape[-2:], mode="nearest")
    expected = F.binary_cross_entropy_with_logits(out.logits, target)
    torch.testing.assert_close(out.loss, expected)


def test_dice_loss_weight_adds_a_per_sample_soft_dice_term():
    torch.manual_seed(0)
    model = DetrisForReferringSegmentation(tiny_config(dice_loss_weight=0.5)).eval()
    pixel_values, input_ids, labels = tiny_inputs(model.config)
    out = model(pixel_values=pixel_values, input_ids=input_ids, labels=labels)
    target = F.interpolate(labels[:, None], size=out.logits.shape[-2:], mode="nearest")
    probs = out.logits.sigmoid()
    dice = [1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1) for p, t in zip(probs, target)]
    expected = F.binary_cross_entropy_with_logits(out.logits, target) + 0.5 * torch.stack(dice).mean()
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="dice_loss_weight must be >= 0, got -1"):
        tiny_config(dice_loss_weight=-1.0)


def test_only_adapters_and_head_are_trainable(tiny_model):
    trainable = {name for name, p in tiny_model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert name.startswith(("neck.", "decoder.", "projector.")) or is_adapter_key(name), name
    assert any(".mlp.dense_aligner." in n for n in trainable) and any(".mlp.text_adapter." in n for n in trainable)
    frozen = {name for name, p in tiny_model.named_parameters() if not p.requires_grad}
    # the frozen backbones keep transformers' DINOv2 / CLIP key names
    assert "vision_model.encoder.layer.1.mlp.fc1.weight" in frozen
    assert "text_model.text_model.embeddings.token_embedding.weight" in frozen and "logit_scale" in frozen


def test_gradients_reach_every_adapter_through_the_frozen_backbones():
    torch.manual_seed(0)
    model = DetrisForReferringSegmentation(tiny_config(vision_adapter_attention_dropout=0.0, decoder_dropout=0.0)).train()
    pixel_values, input_ids, labels = tiny_inputs(model.config)
    model(pixel_values=pixel_values, input_ids=input_ids, labels=labels).loss.backward()
    # Exempt by the maths: the q/k thirds of the neck gates (a single key), and conv biases right before a
    # BatchNorm in training mode (the batch mean removes them); they still get a gradient tensor.
    exempt = (".fusion", ".conv.bias")
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            if not any(part in name for part in exempt):
                assert param.grad.abs().sum() > 0, name
        if not param.requires_grad:
            assert param.grad is None, name


def test_adapters_sit_in_the_configured_mlps(tiny_model):
    config = tiny_model.config
    for index, layer in enumerate(tiny_model.vision_model.encoder.layer):
        assert isinstance(layer.mlp.dense_aligner, DenseAligner) == (index in config.vision_adapter_layers)
    for index, layer in enumerate(tiny_model.text_model.text_model.encoder.layers):
        assert isinstance(layer.mlp.text_adapter, TextAdapter) == (index in config.text_adapter_layers)


def test_save_and_reload_identical_through_auto_model(tiny_model, tmp_path):
    pixel_values, input_ids, _ = tiny_inputs(tiny_model.config)
    # change the BatchNorm statistics away from their init so the round trip has to carry them
    with torch.no_grad():
        for module in tiny_model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    tiny_model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is DetrisForReferringSegmentation
    with torch.no_grad():
        expected = tiny_model(pixel_values=pixel_values, input_ids=input_ids).logits
        actual = reloaded(pixel_values=pixel_values, input_ids=input_ids).logits
    assert torch.equal(expected, actual)
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == {
        n for n, p in tiny_model.named_parameters() if p.requires_grad
    }



def test_weights_missing_from_a_checkpoint_get_the_fresh_model_initialisation(tiny_model, tmp_path):
    """A checkpoint with only the backbones (e.g. a base without head): every missing tensor is initialised as a freshly
    built model's would be, none is left as uninitialised memory (CLIP's unused logit_scale included)."""
    from safetensors.torch import load_file, save_file

    tiny_model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    backbones = {k: v for k, v in weights.items() if k.startswith(("vision_model.", "text_model.")) and not is_adapter_key(k)}
    assert len(backbones) < len(weights) and "logit_scale" not in backbones
    save_file(backbones, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = DetrisForReferringSegmentation.from_pretrained(tmp_path)
    fresh = dict(tiny_model.state_dict())
    assert loaded.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    for name, tensor in loaded.state_dict().items():
        assert torch.isfinite(tensor.float()).all(), name
        if name.startswith(("neck.", "decoder.", "projector.")) and tensor.is_floating_point() and tensor.numel() > 16:
            reference = fresh[name].float()
            assert tensor.float().std() <= 2 * reference.std() + 1e-6 and tensor.abs().max() <= 2 * reference.abs().max() + 1e-6, name


def test_input_embeddings_are_the_text_token_embeddings(tiny_model):
    embeddings = tiny_model.get_input_embeddings()
    assert embeddings is tiny_model.text_model.text_model.embeddings.token_embedding
    replacement = torch.nn.Embedding(embeddings.num_embeddings, embeddings.embedding_dim)
    tiny_model.set_input_embeddings(replacement)
    assert tiny_model.get_input_embeddings() is replacement
    tiny_model.set_input_embeddings(embeddings)

def test_eager_and_sdpa_agree(tiny_model):
    pixel_values, input_ids, _ = tiny_inputs(tiny_model.config)
    outputs = {}
    for implementation in ("eager", "sdpa"):
        tiny_model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = tiny_model(pixel_values=pixel_values, input_ids=input_ids).logits
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, i: (p[:, :, :28], i), r"pixel_values must have shape \[batch, 3, 56, 56\]"),
        (lambda p, i: (p, i[:, :5]), r"input_ids must have shape \[batch, word_len=7\]"),
        (lambda p, i: (p[:1], i), "same batch size"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_model, change, message):
    pixel_values, input_ids, _ = tiny_inputs(tiny_model.config)
    pixel_values, input_ids = change(pixel_values, input_ids)
    with pytest.raises(ValueError, match=message):
        tiny_model(pixel_values=pixel_values, input_ids=input_ids)


def test_unknown_forward_argument_is_refused(tiny_model):
    pixel_values, input_ids, _ = tiny_inputs(tiny_model.config)
    with pytest.raises(TypeError, match="pixel_mask"):
        tiny_model(pixel_values=pixel_values, input_ids=input_ids, pixel_mask=None)


def test_official_adapter_init():
    torch.manual_seed(0)
    config = tiny_config(vision_adapter_dim=64, vision_adapter_attention_dim=64)
    model = DetrisForReferringSegmentation(config)
    aligner = model.vision_model.encoder.layer[1].mlp.dense_aligner
    # linears N(0, 0.02) with zero bias (the official effective init), convs Kaiming-normal, BatchNorm 1/0
    assert abs(aligner.down_proj.weight.std().item() - 0.02) < 0.004
    assert torch.count_nonzero(aligner.down_proj.bias) == 0 and torch.count_nonzero(aligner.up_proj.bias) == 0
    conv = aligner.dense_moc.branch1.conv.weight
    assert abs(conv.std().item() - math.sqrt(2.0 / conv[0].numel())) < 0.2 * math.sqrt(2.0 / conv[0].numel())
    assert torch.all(aligner.dense_moc.branch1.bn.weight == 1)
    text = model.text_model.text_model.encoder.layers[1].mlp.text_adapter
    bound = 1 / math.sqrt(text.down_proj.weight.shape[1])
    assert text.down_proj.weight.abs().max() <= bound and text.up_proj.weight.abs().max() > 0


def test_zero_init_adapters_start_as_a_no_op():
    torch.manual_seed(0)
    with_adapters = DetrisForReferringSegmentation(tiny_config(adapter_init="zeros")).eval()
    without = DetrisForReferringSegmentation(tiny_config(adapters_in_model=False)).eval()
    state = {k: v for k, v in with_adapters.state_dict().items() if not is_adapter_key(k)}
    without.load_state_dict(state, strict=True)
    pixel_values, input_ids, _ = tiny_inputs(with_adapters.config)
    with torch.no_grad():
        torch.testing.assert_close(
            with_adapters(pixel_values=pixel_values, input_ids=input_ids).logits,
            without(pixel_values=pixel_values, input_ids=input_ids).logits,
        )


def test_position_embeddings_follow_the_original_interpolation(tiny_model):
    # the tiny table is 5x5 (70 px), the input 4x4 (56 px): bicubic, scale (4 + 0.1) / 5, no antialiasing
    embeddings = tiny_model.vision_model.embeddings
    table = embeddings.position_embeddings
    dim = table.shape[-1]
    patch = table[:, 1:].reshape(1, 5, 5, dim).permute(0, 3, 1, 2)
    expected = F.interpolate(patch, scale_factor=(4.1 / 5, 4.1 / 5), mode="bicubic", align_corners=False)
    expected = torch.cat([table[:, :1], expected.permute(0, 2, 3, 1).reshape(1, 16, dim)], dim=1)
    actual = embeddings.interpolate_pos_encoding(torch.zeros(1, 17, dim), 56, 56)
    torch.testing.assert_close(actual, expected)
    antialiased = F.interpolate(patch, size=(4, 4), mode="bicubic", antialias=True)
    assert not torch.allclose(expected[:, 1:], antialiased.permute(0, 2, 3, 1).reshape(1, 16, dim))


def test_from_backbones_loads_local_pretrained_folders(tmp_path):
    config = tiny_config()
    torch.manual_seed(1)
    vision = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**config.vision_config.to_dict()))
    text = CLIPTextModelWithProjection(CLIPTextConfig(**config.text_config.to_dict()))
    vision.save_pretrained(tmp_path / "vision")
    text.save_pretrained(tmp_path / "text")
    model = DetrisForReferringSegmentation.from_backbones(str(tmp_path / "vision"), str(tmp_path / "text"), config=config)
    torch.testing.assert_close(
        model.vision_model.encoder.layer[1].mlp.fc1.weight, vision.encoder.layer[1].mlp.fc1.weight
    )
    torch.testing.assert_close(model.vision_model.embeddings.position_embeddings, vision.embeddings.position_embeddings)
    torch.testing.assert_close(model.text_model.text_projection.weight, text.text_projection.weight)
    assert model.config.vision_adapter_layers == config.vision_adapter_layers
    pixel_values, input_ids, labels = tiny_inputs(model.config)
    assert torch.isfinite(model(pixel_values=pixel_values, input_ids=input_ids, labels=labels).loss)


def test_activation_checkpointing_gives_the_same_gradients():
    config = tiny_config(vision_adapter_attention_dropout=0.0, decoder_dropout=0.0)
    torch.manual_seed(0)
    model = DetrisForReferringSegmentation(config).train()  # transformers only checkpoints in training mode
    pixel_values, input_ids, labels = tiny_inputs(config)
    aligner = model.vision_model.encoder.layer[1].mlp.dense_aligner
    calls = []
    aligner.register_forward_hook(lambda *args: calls.append(1))

    def grads():
        model.zero_grad()
        calls.clear()
        model(pixel_values=pixel_values, input_ids=input_ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed, checkpointed_calls = grads()
    assert (plain_calls, checkpointed_calls) == (1, 2), "the Dense Aligner must re-run (with its word features) in backward"
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], msg=name)


def test_bfloat16_model_runs_with_bfloat16_adapters(tiny_model):
    model = DetrisForReferringSegmentation(tiny_config()).to(torch.bfloat16).eval()
    pixel_values, input_ids, _ = tiny_inputs(model.config)
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_ids=input_ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    aligner = model.vision_model.encoder.layer[1].mlp.dense_aligner
    assert aligner.down_proj.weight.dtype == torch.bfloat16


def test_standalone_adapters_match_their_formulas():
    torch.manual_seed(0)
    aligner = DenseAligner(hidden_size=32, width=16, text_dim=32, grid_size=4, num_prefix_tokens=5, attention_dim=16, num_heads=2).eval()
    init_adapter_weights(aligner)
    x = torch.randn(2, 21, 32)
    words = torch.randn(2, 7, 32)
    x0 = torch.relu(aligner.down_proj(x))
    grid = x0[:, 5:].transpose(1, 2).reshape(2, 16, 4, 4)
    mixed = (aligner.dense_moc(grid) + grid).flatten(2).transpose(1, 2)
    attended = aligner.cross_attention(mixed, words)
    expected = aligner.up_proj(torch.cat([2 * x0[:, :5], attended + x0[:, 5:]], dim=1))
    torch.testing.assert_close(aligner(x, words), expected)
    text = TextAdapter(hidden_size=32, width=16).eval()
    init_adapter_weights(text)
    h = torch.randn(2, 7, 32)
    t0 = torch.relu(text.down_proj(h))
    mixed = text.dense_moc(t0[:, 1:].transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(text(h), text.up_proj(torch.cat([2 * t0[:, :1], mixed + t0[:, 1:]], dim=1)))
