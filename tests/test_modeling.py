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
        tiny_model.set_attn_implementation(implementation)  # switched at run time, backbones and head alike
        assert tiny_model.config.vision_config._attn_implementation == implementation == tiny_model.config.text_config._attn_implementation
        with torch.no_grad():
            out = tiny_model(pixel_values=pixel_values, input_ids=input_ids, output_attentions=True)
        outputs[implementation] = out.logits
        computed = [a is not None for a in out.attentions + out.text_attentions]
        assert all(computed) if implementation == "eager" else not any(computed)  # SDPA computes no weights
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


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("input_require_grads", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant, input_require_grads):
    """Both checkpointing modes, with and without `enable_input_require_grads()` (which peft's preparation calls):
    every adapter and head parameter gets the gradient it gets without checkpointing."""
    config = tiny_config(vision_adapter_attention_dropout=0.0, decoder_dropout=0.0)
    torch.manual_seed(0)
    model = DetrisForReferringSegmentation(config).train()  # transformers only checkpoints in training mode
    pixel_values, input_ids, labels = tiny_inputs(config)
    aligner = model.vision_model.encoder.layer[1].mlp.dense_aligner
    calls = []
    aligner.register_forward_hook(lambda *args: calls.append(1))

    start = {k: v.clone() for k, v in model.state_dict().items()}

    def grads():
        model.load_state_dict(start)  # the same BatchNorm statistics before each step
        model.zero_grad()
        calls.clear()
        model(pixel_values=pixel_values, input_ids=input_ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = grads()
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert plain.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if input_require_grads:
        model.enable_input_require_grads()
    checkpointed, checkpointed_calls = grads()
    assert (plain_calls, checkpointed_calls) == (1, 2), "the Dense Aligner must re-run (with its word features) in backward"
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], msg=name)
    # the recomputation does not count the batch a second time in the adapters' BatchNorm statistics
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, plain_state[key], msg=key, rtol=0, atol=0)


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


# ----- outputs as transformers models give them ------------------------------------------------------------------
def test_hidden_states_and_attentions_from_kwargs_and_config():
    torch.manual_seed(0)
    config = tiny_config()
    config._attn_implementation = "eager"
    model = DetrisForReferringSegmentation(config).eval()
    pixel_values, input_ids, _ = tiny_inputs(config)
    vision, text = config.vision_config, config.text_config
    tokens = config.num_prefix_tokens + config.grid_size**2
    with torch.no_grad():
        plain = model(pixel_values=pixel_values, input_ids=input_ids)
        out = model(pixel_values=pixel_values, input_ids=input_ids, output_hidden_states=True, output_attentions=True)
    assert plain.hidden_states is None and plain.attentions is None and plain.text_hidden_states is None
    assert len(out.hidden_states) == vision.num_hidden_layers + 1 and len(out.text_hidden_states) == text.num_hidden_layers + 1
    assert {tuple(h.shape) for h in out.hidden_states} == {(2, tokens, vision.hidden_size)}
    assert {tuple(h.shape) for h in out.text_hidden_states} == {(2, config.word_len, text.hidden_size)}
    assert len(out.attentions) == vision.num_hidden_layers and len(out.text_attentions) == text.num_hidden_layers
    assert {tuple(a.shape) for a in out.attentions} == {(2, vision.num_attention_heads, tokens, tokens)}
    assert {tuple(a.shape) for a in out.text_attentions} == {(2, text.num_attention_heads, config.word_len, config.word_len)}
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, vision.num_attention_heads, tokens))
    assert torch.all(out.text_attentions[0].triu(1) == 0)  # the CLIP text encoder is causal
    # the neck taps are the raw outputs of the tap blocks
    tap = out.hidden_states[config.neck_tap_layers[0] + 1][:, config.num_prefix_tokens :]
    torch.testing.assert_close(tap.unflatten(1, (config.grid_size, config.grid_size)).permute(0, 3, 1, 2), out.vision_features[0])

    # the same from the config
    model.config.output_hidden_states = True
    model.config.output_attentions = True
    try:
        with torch.no_grad():
            from_config = model(pixel_values=pixel_values, input_ids=input_ids)
    finally:
        model.config.output_hidden_states = False
        model.config.output_attentions = False
    assert len(from_config.hidden_states) == len(out.hidden_states) and len(from_config.text_attentions) == len(out.text_attentions)


def test_output_hidden_states_as_indices_selects_layers_and_keeps_the_neck_taps(tiny_model):
    pixel_values, input_ids, _ = tiny_inputs(tiny_model.config)
    with torch.no_grad():
        full = tiny_model(pixel_values=pixel_values, input_ids=input_ids, output_hidden_states=True)
        some = tiny_model(pixel_values=pixel_values, input_ids=input_ids, output_hidden_states=[0, 2, -1])
    assert len(some.hidden_states) == 3 and len(some.text_hidden_states) == 3
    for ours, index in zip(some.hidden_states, [0, 2, -1]):
        assert torch.equal(ours, full.hidden_states[index])
    for ours, index in zip(some.text_hidden_states, [0, 2, -1]):
        assert torch.equal(ours, full.text_hidden_states[index])
    assert torch.equal(some.logits, full.logits)


def test_return_dict_false_gives_the_same_values_as_a_tuple(tiny_model):
    pixel_values, input_ids, labels = tiny_inputs(tiny_model.config)
    with torch.no_grad():
        as_dict = tiny_model(pixel_values=pixel_values, input_ids=input_ids, labels=labels, output_hidden_states=True)
        as_tuple = tiny_model(pixel_values=pixel_values, input_ids=input_ids, labels=labels, output_hidden_states=True, return_dict=False)
        tiny_model.config.return_dict = False
        try:
            from_config = tiny_model(pixel_values=pixel_values, input_ids=input_ids)
        finally:
            tiny_model.config.return_dict = True
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    assert len(as_tuple) == len(as_dict.to_tuple()) and torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    hidden = as_tuple[list(as_dict.keys()).index("hidden_states")]
    assert all(torch.equal(a, b) for a, b in zip(hidden, as_dict.hidden_states))
    assert torch.equal(from_config[0], as_dict.logits)


# ----- frozen means frozen ---------------------------------------------------------------------------------------
def test_frozen_batch_norms_keep_their_statistics_in_train_mode():
    torch.manual_seed(0)
    model = DetrisForReferringSegmentation(tiny_config())
    model.neck.requires_grad_(False)  # e.g. a head trained elsewhere, kept fixed while the adapters train
    model.train()
    neck_norms = [m for m in model.neck.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    adapter_norms = [m for m in model.vision_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert neck_norms and adapter_norms and not any(m.training for m in neck_norms) and all(m.training for m in adapter_norms)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    pixel_values, input_ids, labels = tiny_inputs(model.config)
    model(pixel_values=pixel_values, input_ids=input_ids, labels=labels).loss.backward()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("neck."))
    assert any(not torch.equal(before[k], after[k]) for k in before if ".dense_aligner." in k)
    model.eval()
    assert not any(m.training for m in model.modules())


# ----- one init path -----------------------------------------------------------------------------------------------
def test_construction_and_loading_with_missing_tensors_initialise_identically(tmp_path, monkeypatch):
    """All weight initialisation is `_init_weights` (no `initialize_weights` override): with the seed fixed per
    module, as transformers' own test does, a model built from its config and one loaded from a checkpoint that lacks
    the adapters and the head get identical tensors, for both adapter init modes."""
    from safetensors.torch import load_file, save_file
    from transformers import PreTrainedModel

    from modeling_detris import DetrisPreTrainedModel

    assert "initialize_weights" not in vars(DetrisPreTrainedModel) and "_init_weights" in vars(DetrisPreTrainedModel)
    seeded = PreTrainedModel._initialize_weights

    def initialize_with_a_fixed_seed(self, module, *args, **kwargs):
        torch.manual_seed(0)
        return seeded(self, module, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", initialize_with_a_fixed_seed)
    for mode in ("official", "zeros"):
        config = tiny_config(adapter_init=mode)
        built = DetrisForReferringSegmentation(config)
        built.save_pretrained(tmp_path / mode)
        weights = load_file(str(tmp_path / mode / "model.safetensors"))
        kept = {k: v for k, v in weights.items() if not is_adapter_key(k) and not k.startswith(("neck.", "decoder.", "projector."))}
        save_file(kept, str(tmp_path / mode / "model.safetensors"), metadata={"format": "pt"})
        loaded = DetrisForReferringSegmentation.from_pretrained(tmp_path / mode)
        reference = built.state_dict()
        different = [k for k, v in loaded.state_dict().items() if not torch.equal(v, reference[k])]
        assert not different, (mode, different[:5])
        up_proj = loaded.vision_model.encoder.layer[1].mlp.dense_aligner.up_proj.weight
        assert (torch.count_nonzero(up_proj) == 0) == (mode == "zeros")


# ----- inputs the model refuses ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, i, l: (p, i, l * 2), r"labels must be masks with values in \[0, 1\], got values in \[0.0, 2.0\]"),
        (lambda p, i, l: (p, i, l - 1), r"labels must be masks with values in \[0, 1\]"),
        (lambda p, i, l: ((p * 255).to(torch.uint8), i, l), "use the processor"),
        (lambda p, i, l: (p[:0], i[:0], l[:0]), "batch is empty"),
        (lambda p, i, l: (p, i[:1], l), "same batch size"),
        (lambda p, i, l: (p, i, l[:1]), "labels must have batch size 2"),
        (lambda p, i, l: (p, i + 500, l), r"input_ids must be in \[0, 199\]"),
        (lambda p, i, l: (p, i - 1, l), r"input_ids must be in \[0, 199\].*got values in \[-1"),
    ],
)
def test_bad_inputs_are_refused_with_the_range(tiny_model, change, message):
    pixel_values, input_ids, labels = change(*tiny_inputs(tiny_model.config))
    with pytest.raises(ValueError, match=message):
        tiny_model(pixel_values=pixel_values, input_ids=input_ids, labels=labels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_images_run_on_an_fp32_model(tiny_model, dtype):
    pixel_values, input_ids, _ = tiny_inputs(tiny_model.config)
    with torch.no_grad():
        reference = tiny_model(pixel_values=pixel_values.to(dtype).float(), input_ids=input_ids).logits
        out = tiny_model(pixel_values=pixel_values.to(dtype), input_ids=input_ids).logits
    assert out.dtype == torch.float32 and torch.equal(out, reference)


def test_checkpoints_of_the_former_key_layout_load_with_the_legacy_key_mapping(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from modeling_detris.peft_detris import LEGACY_KEY_MAPPING

    tiny_model.save_pretrained(tmp_path)
    config = tiny_model.config
    adapted = [f"vision_model.encoder.layer.{i}.mlp." for i in config.vision_adapter_layers]
    adapted += [f"text_model.text_model.encoder.layers.{i}.mlp." for i in config.text_adapter_layers]
    former = {}
    for key, value in load_file(str(tmp_path / "model.safetensors")).items():
        for old, new in ((".mlp.dense_aligner.", ".mlp.detris_dense_aligner.default."), (".mlp.text_adapter.", ".mlp.detris_text_adapter.default.")):
            key = key.replace(old, new)
        prefix = next((p for p in adapted if key.startswith(p + "fc")), None)
        former[key.replace(prefix, prefix + "base_layer.") if prefix else key] = value
    assert any(".mlp.base_layer.fc1." in k for k in former)
    save_file(former, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded, info = DetrisForReferringSegmentation.from_pretrained(tmp_path, key_mapping=LEGACY_KEY_MAPPING, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = tiny_model.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())


def test_returned_states_take_gradients_although_the_backbones_are_frozen():
    """Attribution tools take gradients against hidden states and attention weights (transformers' `retain_grad`
    check does the same); the frozen embeddings' outputs are made part of the graph when states are returned."""
    torch.manual_seed(0)
    config = tiny_config()
    config._attn_implementation = "eager"
    model = DetrisForReferringSegmentation(config).eval()
    pixel_values, input_ids, _ = tiny_inputs(config)
    out = model(pixel_values=pixel_values, input_ids=input_ids, output_hidden_states=True, output_attentions=True)
    states = (out.hidden_states[0], out.attentions[0], out.text_hidden_states[0], out.text_attentions[0])
    for state in states:
        state.retain_grad()
    out.logits.flatten()[0].backward()
    assert all(state.grad is not None for state in states)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    with torch.no_grad():
        assert not model(pixel_values=pixel_values, input_ids=input_ids, output_hidden_states=True).hidden_states[0].requires_grad
