"""The DETRIS adapters as a PEFT method, on tiny models (CPU, seconds).

Fresh-process loading is in test_peft_fresh_process.py; this file covers everything that can run in-process.
"""

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import load_file
from transformers import AutoModel

from configuration_detris import DetrisConfig
from conftest import tiny_config, tiny_inputs
from modeling_detris import (
    DenseAlignerLayer,
    DetrisAdapterConfig,
    DetrisAdapterModel,
    DetrisForReferringSegmentation,
    DetrisPeftType,
    TextAdapterLayer,
    to_standalone_model,
)
from modeling_detris.peft_detris import DetrisLayer, is_adapter_key, standalone_key

HEAD = ("neck", "decoder", "projector")


def base_config(**overrides):
    # No dropout, so train-mode outputs and gradients are deterministic.
    settings = dict(adapters_in_model=False, vision_adapter_attention_dropout=0.0, decoder_dropout=0.0)
    settings.update(overrides)
    return tiny_config(**settings)


def make_base(seed=0, **overrides):
    torch.manual_seed(seed)
    return DetrisForReferringSegmentation(base_config(**overrides)).eval()


def logits(model, inputs):
    pixel_values, input_ids, _ = inputs
    with torch.no_grad():
        return model(pixel_values=pixel_values, input_ids=input_ids).logits


def fit_batch_norms(model, inputs):
    """Two train-mode forwards move every BatchNorm's running statistics away from their init, so a reload that
    dropped them would show in the eval outputs."""
    pixel_values, input_ids, _ = inputs
    model.train()
    with torch.no_grad():
        model(pixel_values=pixel_values, input_ids=input_ids)
        model(pixel_values=2 * pixel_values + 1, input_ids=input_ids)
    model.eval()


def adapter_config(config, **overrides):
    return DetrisAdapterConfig.from_model_config(config, **overrides)


def detris_layers(model):
    return [m for m in model.modules() if isinstance(m, DetrisLayer)]


def pre_hook_count(model):
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_this_module(one_thread):
    yield


@pytest.fixture(scope="module")
def inputs():
    return tiny_inputs(base_config())


# ----- registration and config -----------------------------------------------------------------------------------
def test_method_is_registered_with_peft():
    peft_type = DetrisPeftType.DETRIS
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is DetrisAdapterConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is DetrisAdapterModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == DetrisAdapterModel.prefix == "detris_"
    # transformers derives the prefix from the type: f"{peft_type.value.lower()}_".
    assert f"{peft_type.value.lower()}_" == DetrisAdapterModel.prefix
    assert PEFT_TYPE_TO_CONFIG_MAPPING["DETRIS"] is DetrisAdapterConfig  # what a JSON string looks up


def test_config_defaults_presets_and_json_round_trip(tmp_path):
    config = DetrisAdapterConfig()
    assert config.peft_type is DetrisPeftType.DETRIS
    assert config.adapter_init == "official"
    assert config.modules_to_save == list(HEAD)
    assert config.vision_adapter_layers == [1, 3, 5, 7, 9, 11] and config.vision_adapter_dim == 128
    assert config.text_adapter_layers == [1, 3, 5, 7, 9, 11] and config.text_adapter_dim == 64
    assert config.target_modules == (
        r"vision_model\.encoder\.layer\.(?:1|3|5|7|9|11)\.mlp|text_model\.text_model\.encoder\.layers\.(?:1|3|5|7|9|11)\.mlp"
    )
    assert DetrisAdapterConfig.from_preset("detris-b") == DetrisAdapterConfig.from_preset("base") == config
    large = DetrisAdapterConfig.from_preset("large")
    assert large.vision_adapter_layers == [2, 6, 10, 14, 18, 22] and large.vision_adapter_dim == 128
    mixed = DetrisAdapterConfig.from_preset("detris-l*")
    assert mixed.vision_adapter_layers == list(range(1, 24)) and mixed.vision_adapter_dim == 384
    assert mixed.text_adapter_layers == list(range(1, 12)) and mixed.text_adapter_dim == 384
    for preset in ("base", "large", "large-mixed"):
        model_config = DetrisConfig.from_preset(preset)
        from_model = DetrisAdapterConfig.from_model_config(model_config)
        assert from_model == DetrisAdapterConfig.from_preset(preset)
        assert from_model.to_model_config_kwargs()["vision_adapter_layers"] == model_config.vision_adapter_layers

    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "DETRIS" and saved["target_modules"] == config.target_modules
    loaded = DetrisAdapterConfig.from_pretrained(tmp_path)
    assert loaded.peft_type is DetrisPeftType.DETRIS  # an Enum member again, not the JSON string
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(vision_adapter_dim=20), "vision_adapter_dim must be a positive multiple of 16"),
        (dict(text_adapter_dim=0), "text_adapter_dim must be a positive multiple of 16"),
        (dict(vision_adapter_layers=[1, 1]), "vision_adapter_layers lists a block twice: [1, 1]"),
        (dict(text_adapter_layers=[-1]), "text_adapter_layers must be a list of non-negative block indices, got [-1]"),
        (dict(vision_adapter_layers=[], text_adapter_layers=[]), "at least one adapter layer"),
        (dict(adapter_init="normal"), "adapter_init must be one of ('official', 'zeros'), got 'normal'"),
        (dict(vision_adapter_attention_dim=12, vision_adapter_attention_heads=8), "(12) must be a positive multiple of"),
        (dict(bias="all"), "bias must be 'none', got 'all'"),
        (dict(layers_to_transform=[1]), "does not use layers_to_transform"),
        (dict(target_modules=["mlp"]), "target_modules is derived from the layer lists: expected"),
    ],
)
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError) as error:
        DetrisAdapterConfig(**overrides)
    assert message in str(error.value)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match=r"unknown DETRIS preset 'xl'; expected one of"):
        DetrisAdapterConfig.from_preset("xl")


def test_b_preset_adapter_parameter_count_on_meta_device():
    with torch.device("meta"):
        base = DetrisForReferringSegmentation(DetrisConfig.from_preset("base", adapters_in_model=False))
        model = get_peft_model(base, DetrisAdapterConfig.from_preset("base", modules_to_save=None))
    adapters = sum(p.numel() for n, p in model.named_parameters() if is_adapter_key(n))
    trainable, _ = model.get_nb_trainable_parameters()
    assert adapters == trainable == 2_715_696
    dense = sum(p.numel() for n, p in model.named_parameters() if ".detris_dense_aligner." in n)
    assert dense + sum(p.numel() for n, p in model.named_parameters() if ".detris_text_adapter." in n) == adapters
    assert adapters == sum(p.numel() for m in model.get_base_model().adapter_modules().values() for p in m.parameters())
    # The same adapters built in at construction (the standalone layout) count the same.
    with torch.device("meta"):
        builtin = DetrisForReferringSegmentation(DetrisConfig.from_preset("base"))
    assert sum(p.numel() for n, p in builtin.named_parameters() if is_adapter_key(n)) == 2_715_696


# ----- get_peft_model ---------------------------------------------------------------------------------------------
def test_get_peft_model_trains_adapters_and_head_only(inputs, capsys):
    base = make_base()
    model = get_peft_model(base, adapter_config(base.config))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert is_adapter_key(name) or any(f"{h}.modules_to_save.default." in name for h in HEAD), name
    assert any(".detris_dense_aligner.default." in n for n in trainable)
    assert any(".detris_text_adapter.default." in n for n in trainable)
    assert all(any(n.startswith(f"base_model.model.{h}.modules_to_save.default.") for n in trainable) for h in HEAD)
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    assert wrapped == set(HEAD)

    inner = model.get_base_model()
    layers = {n: type(m) for n, m in inner.named_modules() if isinstance(m, DetrisLayer)}
    assert layers == {
        "vision_model.encoder.layer.1.mlp": DenseAlignerLayer,
        "vision_model.encoder.layer.3.mlp": DenseAlignerLayer,
        "text_model.text_model.encoder.layers.1.mlp": TextAdapterLayer,
        "text_model.text_model.encoder.layers.2.mlp": TextAdapterLayer,
    }
    adapters = sum(p.numel() for n, p in model.named_parameters() if is_adapter_key(n))
    head = sum(p.numel() for h in HEAD for p in getattr(inner, h).modules_to_save["default"].parameters())
    trainable_count, total = model.get_nb_trainable_parameters()
    assert trainable_count == adapters + head
    model.print_trainable_parameters()
    assert f"trainable params: {trainable_count:,d} || all params: {total:,d}" in capsys.readouterr().out

    # Gradients reach every adapter through the frozen backbones, and no frozen weight gets one.
    model.train()
    pixel_values, input_ids, labels = inputs
    model(pixel_values=pixel_values, input_ids=input_ids, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name


def test_builtin_adapters_and_peft_share_one_implementation_and_a_key_mapping(inputs):
    """A standalone model (adapters_in_model=True) keeps transformers' backbone key names with its adapters beside
    the MLP's linears; the PEFT injection with the same config holds the same adapter modules under PEFT's keys.
    `standalone_key` maps one onto the other and the outputs are the same for the same weights."""
    torch.manual_seed(0)
    builtin = DetrisForReferringSegmentation(base_config(adapters_in_model=True)).eval()
    assert "peft_config" not in builtin.__dict__
    assert "vision_model.encoder.layer.1.mlp.fc1.weight" in builtin.state_dict()
    assert "vision_model.encoder.layer.1.mlp.dense_aligner.down_proj.weight" in builtin.state_dict()
    assert "text_model.text_model.encoder.layers.1.mlp.text_adapter.up_proj.weight" in builtin.state_dict()
    trainable = {n.split(".")[0] for n, p in builtin.named_parameters() if p.requires_grad}
    assert trainable == {"vision_model", "text_model", *HEAD}

    base = make_base()
    peft_model = get_peft_model(base, adapter_config(base.config, modules_to_save=None))
    inner = peft_model.get_base_model()
    assert "vision_model.encoder.layer.1.mlp.base_layer.fc1.weight" in inner.state_dict()
    assert "vision_model.encoder.layer.1.mlp.detris_dense_aligner.default.down_proj.weight" in inner.state_dict()
    mapping = {key: standalone_key(key, "default") for key in inner.state_dict()}
    assert set(mapping.values()) == set(builtin.state_dict())
    assert {type(m) for m in inner.adapter_modules().values()} == {type(m) for m in builtin.adapter_modules().values()}
    builtin_state = builtin.state_dict()
    inner.load_state_dict({key: builtin_state[standalone] for key, standalone in mapping.items()})
    torch.testing.assert_close(logits(peft_model, inputs), logits(builtin, inputs), rtol=0, atol=0)


def test_zero_init_starts_as_the_base_model(inputs):
    base = make_base()
    expected = logits(base, inputs)
    model = get_peft_model(base, adapter_config(base.config, adapter_init="zeros"))
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    official = get_peft_model(make_base(), adapter_config(base.config))
    assert not torch.equal(logits(official, inputs), expected)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(vision_adapter_layers=[0], text_adapter_layers=[], vision_adapter_dim=32),
        dict(vision_adapter_layers=[], text_adapter_layers=[0, 1, 2, 3], text_adapter_dim=48),
        dict(vision_adapter_layers=[0, 1, 2, 3], text_adapter_layers=[3], vision_adapter_dim=64, adapter_scale=0.5),
    ],
)
def test_any_layer_lists_and_dims(overrides, inputs):
    base = make_base()
    model = get_peft_model(base, adapter_config(base.config, **overrides))
    inner = model.get_base_model()
    vision = {i for i, layer in enumerate(inner.vision_model.encoder.layer) if isinstance(layer.mlp, DenseAlignerLayer)}
    text = {i for i, layer in enumerate(inner.text_model.text_model.encoder.layers) if isinstance(layer.mlp, TextAdapterLayer)}
    config = model.peft_config["default"]
    assert vision == set(config.vision_adapter_layers) and text == set(config.text_adapter_layers)
    for i in vision:
        assert inner.vision_model.encoder.layer[i].mlp.detris_dense_aligner["default"].down_proj.out_features == config.vision_adapter_dim
    for i in text:
        assert inner.text_model.text_model.encoder.layers[i].mlp.detris_text_adapter["default"].down_proj.out_features == config.text_adapter_dim
    assert logits(model, inputs).shape == (2, 1, 16, 16)


def test_layer_the_base_lacks_is_refused():
    base = make_base()
    with pytest.raises(ValueError) as error:
        get_peft_model(base, adapter_config(base.config, vision_adapter_layers=[1, 7]))
    assert "vision_adapter_layers has [7], but the base model's vision encoder has 4 layers (expected indices in [0, 3])" in str(error.value)
    with pytest.raises(ValueError, match=r"text_adapter_layers has \[4, 11\].*text encoder has 4 layers"):
        get_peft_model(make_base(), adapter_config(base.config, text_adapter_layers=[1, 4, 11]))


def test_non_detris_base_is_refused():
    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"needs a DetrisForReferringSegmentation base model .* got Other"):
        inject_adapter_in_model(DetrisAdapterConfig(), Other())


# ----- adapter-only checkpoints -----------------------------------------------------------------------------------
def test_adapter_only_save_holds_adapters_head_and_batchnorm_statistics(tmp_path, inputs):
    base = make_base()
    model = get_peft_model(base, adapter_config(base.config))
    fit_batch_norms(model, inputs)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert not any(".base_layer." in k or "text_model.text_model.embeddings" in k for k in saved)
    assert not any(".default." in k or "modules_to_save" in k or "original_module" in k for k in saved)
    key = "base_model.model.vision_model.encoder.layer.1.mlp.detris_dense_aligner.dense_moc.branch1.bn.running_mean"
    assert key in saved
    state = model.state_dict()
    expected_stats = state[key.replace("detris_dense_aligner.", "detris_dense_aligner.default.")]
    assert torch.equal(saved[key], expected_stats) and expected_stats.abs().sum() > 0
    text_key = "base_model.model.text_model.text_model.encoder.layers.2.mlp.detris_text_adapter.dense_moc.branch3.bn.running_var"
    assert text_key in saved
    assert "base_model.model.neck.aggr.1.running_mean" in saved  # the head's BatchNorm statistics too
    adapter_keys = {k for k in state if is_adapter_key(k)}
    head_keys = {k for k in state if any(f"{h}.modules_to_save.default." in k for h in HEAD)}
    assert len(saved) == len(adapter_keys) + len(head_keys)

    reloaded = PeftModel.from_pretrained(make_base(), tmp_path)  # make_base() is seeded: the same frozen backbone
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), rtol=0, atol=0)
    lazy = PeftModel.from_pretrained(make_base(), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(logits(lazy, inputs), logits(model, inputs), rtol=0, atol=0)
    assert not any(p.requires_grad for p in reloaded.parameters())  # inference mode by default
    trainable = PeftModel.from_pretrained(make_base(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if is_adapter_key(n))


def test_saved_adapter_with_other_dims_is_refused_with_a_clear_message(tmp_path, inputs):
    base = make_base()
    get_peft_model(base, adapter_config(base.config, modules_to_save=None)).save_pretrained(tmp_path)
    wrong = adapter_config(base.config, vision_adapter_dim=32, modules_to_save=None)
    with pytest.raises(ValueError) as error:
        PeftModel.from_pretrained(make_base(), tmp_path, config=wrong)
    message = str(error.value)
    assert "adapter weight(s) do not fit the model" in message and "vision_adapter_dim" in message
    assert ".detris_dense_aligner.default.cross_attention.back_proj.bias: checkpoint [16], model [32]" in message
    # transformers' load_adapter with an adapter_config.json edited to other dims: transformers refuses the
    # mismatched tensors (its load report, logged above the error, lists them).
    config_file = tmp_path / "adapter_config.json"
    settings = json.loads(config_file.read_text())
    settings["text_adapter_dim"] = 32
    config_file.write_text(json.dumps(settings))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        make_base().load_adapter(str(tmp_path))


def test_adapter_for_another_base_width_is_refused_on_every_route(tmp_path):
    base = make_base()
    get_peft_model(base, adapter_config(base.config)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_vision_hidden_size"] == 32 and saved["base_text_hidden_size"] == 32
    wider = base_config(vision_config=dict(base.config.vision_config.to_dict(), hidden_size=48))
    message = r"built for a base with vision_config.hidden_size=32 .* but the base model has vision_config.hidden_size=48"
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(DetrisForReferringSegmentation(wider), tmp_path)
    with pytest.raises(ValueError, match=message):
        DetrisForReferringSegmentation(wider).load_adapter(str(tmp_path))


# ----- several adapters ----------------------------------------------------------------------------------------
def test_several_adapters_switch_disable_delete(tmp_path, inputs):
    base = make_base()
    plain = copy.deepcopy(base)
    expected_plain = logits(plain, inputs)
    model = get_peft_model(base, adapter_config(base.config), adapter_name="a")
    fit_batch_norms(model, inputs)
    second = adapter_config(base.config, vision_adapter_layers=[0, 1], text_adapter_layers=[3], vision_adapter_dim=32)
    model.add_adapter("b", second)
    model.set_adapter("b")
    fit_batch_norms(model, inputs)  # b's BatchNorms and head copy get their own statistics
    assert model.active_adapters == ["b"]
    out_b = logits(model, inputs)
    model.set_adapter("a")
    out_a = logits(model, inputs)
    assert not torch.equal(out_a, out_b)

    # Each equals the adapter alone: built into a standalone model, and loaded alone onto a fresh base.
    for name, out in (("a", out_a), ("b", out_b)):
        alone = to_standalone_model(model, name).eval()
        torch.testing.assert_close(logits(alone, inputs), out, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()
    only_b = PeftModel.from_pretrained(make_base(), tmp_path / "b", adapter_name="b")
    torch.testing.assert_close(logits(only_b, inputs), out_b, rtol=0, atol=0)
    assert only_b.peft_config["b"].vision_adapter_dim == 32

    # Disabled: the adapter-free model (original head, no adapters).
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), expected_plain, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, inputs), out_a, rtol=0, atol=0)

    # Only the active adapter trains.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)

    # Delete b: a is untouched; layers that only held b lose their adapters. No layer uses a hook.
    inner = model.get_base_model()
    lone_b = inner.text_model.text_model.encoder.layers[3]
    model.delete_adapter("b")
    assert not any(".b." in k for k in model.state_dict())
    assert not lone_b.mlp.adapters and pre_hook_count(model) == 0
    torch.testing.assert_close(logits(model, inputs), out_a, rtol=0, atol=0)
    model.add_adapter("c", adapter_config(base.config, text_adapter_layers=[3], vision_adapter_layers=[]))
    assert list(lone_b.mlp.adapters) == ["c"]
    model.set_adapter("c")
    assert logits(model, inputs).shape == out_a.shape


def test_unload_restores_the_plain_model(inputs):
    base = make_base()
    plain = copy.deepcopy(base)
    model = get_peft_model(base, adapter_config(base.config))
    model.add_adapter("other", adapter_config(base.config, text_adapter_layers=[0, 3]))
    assert pre_hook_count(base) == 0  # the side inputs are arguments, never hooks or stashed tensors
    model(pixel_values=inputs[0], input_ids=inputs[1])
    unloaded = model.unload()
    assert not detris_layers(unloaded)
    assert "peft_config" not in unloaded.__dict__
    assert set(unloaded.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(logits(unloaded, inputs), logits(plain, inputs), rtol=0, atol=0)


def test_merge_is_refused_with_a_pointer_to_the_standalone_export(inputs):
    base = make_base()
    model = get_peft_model(base, adapter_config(base.config))
    with pytest.raises(NotImplementedError, match=r"cannot be merged.*to_standalone_model"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="to_standalone_model"):
        model.base_model.merge_adapter()
    assert detris_layers(model)  # nothing was unloaded


def test_standalone_export_round_trips_through_auto_model(tmp_path, inputs):
    base = make_base()
    model = get_peft_model(base, adapter_config(base.config, vision_adapter_layers=[2], vision_adapter_dim=32, adapter_scale=0.3))
    fit_batch_norms(model, inputs)
    with torch.no_grad():  # the head copy differs from the base's head
        for param in model.get_base_model().projector.modules_to_save["default"].parameters():
            param.add_(0.01)
    expected = logits(model, inputs)
    standalone = to_standalone_model(model)
    assert isinstance(standalone, DetrisForReferringSegmentation) and standalone.config.adapters_in_model
    assert standalone.config.vision_adapter_layers == [2] and standalone.config.vision_adapter_dim == 32
    assert standalone.config.adapter_scale == 0.3
    assert not any(isinstance(m, ModulesToSaveWrapper) for m in standalone.modules())
    standalone.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is DetrisForReferringSegmentation
    torch.testing.assert_close(logits(reloaded, inputs), expected, rtol=0, atol=0)
    trainable = {n.split(".")[0] for n, p in reloaded.named_parameters() if p.requires_grad}
    assert trainable == {"vision_model", "text_model", *HEAD}


# ----- transformers' adapter API on the plain model ---------------------------------------------------------------
def test_transformers_adapter_api(tmp_path, inputs):
    base = make_base()
    model = get_peft_model(copy.deepcopy(base), adapter_config(base.config))
    fit_batch_norms(model, inputs)
    model.save_pretrained(tmp_path)
    expected = logits(model, inputs)

    plain = copy.deepcopy(base)
    expected_plain = logits(plain, inputs)
    plain.load_adapter(str(tmp_path), adapter_name="task")
    torch.testing.assert_close(logits(plain, inputs), expected, rtol=0, atol=0)
    plain.disable_adapters()
    torch.testing.assert_close(logits(plain, inputs), expected_plain, rtol=0, atol=0)
    plain.enable_adapters()
    standalone = to_standalone_model(plain)
    torch.testing.assert_close(logits(standalone.eval(), inputs), expected, rtol=0, atol=0)
    plain.delete_adapter("task")
    assert pre_hook_count(plain) == 0
    assert not any(".task." in k for k in plain.state_dict())


def test_auto_peft_model_needs_the_import_allowlist(tmp_path, inputs):
    from peft import AutoPeftModel

    make_base().save_pretrained(tmp_path / "base")
    base = DetrisForReferringSegmentation.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, adapter_config(base.config))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="not in the import allowlist"):
        AutoPeftModel.from_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModel.from_pretrained(tmp_path / "adapter", import_allowlist=["modeling_detris"])
    assert isinstance(loaded, PeftModel) and isinstance(loaded.get_base_model(), DetrisForReferringSegmentation)
    torch.testing.assert_close(logits(loaded, inputs), logits(model.eval(), inputs), rtol=0, atol=0)


# ----- training details ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("input_require_grads", [False, True])
def test_gradient_checkpointing_of_a_peft_model_gives_the_same_gradients(inputs, use_reentrant, input_require_grads):
    base = make_base()
    model = get_peft_model(base, adapter_config(base.config))
    model.train()  # transformers checkpoints its layers in training mode only; no dropout in this config
    pixel_values, input_ids, labels = inputs

    start = {k: v.clone() for k, v in model.state_dict().items()}

    def grads():
        model.load_state_dict(start)  # the same BatchNorm statistics before each step
        model.zero_grad()
        model(pixel_values=pixel_values, input_ids=input_ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    aligner = model.get_base_model().vision_model.encoder.layer[1].mlp
    aligner.register_forward_hook(lambda *args: calls.append(1))
    plain = grads()
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(calls) == 1 and plain.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if input_require_grads:
        model.enable_input_require_grads()
    assert model.get_base_model().is_gradient_checkpointing
    checkpointed = grads()
    assert len(calls) == 3  # the checkpointed block re-ran the Dense Aligner during backward, with its word features
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], msg=name)
    for key, value in model.state_dict().items():  # BatchNorm statistics counted once, as without checkpointing
        assert torch.equal(value, plain_state[key]), key


def test_bfloat16_base_gets_bfloat16_adapters(inputs):
    base = make_base().to(torch.bfloat16)
    model = get_peft_model(base, adapter_config(base.config), autocast_adapter_dtype=False)
    dtypes = {p.dtype for n, p in model.named_parameters() if is_adapter_key(n)}
    dtypes |= {b.dtype for n, b in model.named_buffers() if is_adapter_key(n) and b.is_floating_point()}
    assert dtypes == {torch.bfloat16}
    out = logits(model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()

    # peft's default upcasts adapter parameters to fp32; the BatchNorm statistics follow and the model still runs.
    upcast = get_peft_model(make_base().to(torch.bfloat16), adapter_config(base.config))
    aligner = upcast.get_base_model().vision_model.encoder.layer[1].mlp.detris_dense_aligner["default"]
    assert aligner.down_proj.weight.dtype == torch.float32
    assert aligner.dense_moc.branch1.bn.running_mean.dtype == torch.float32
    upcast.train()
    upcast(pixel_values=inputs[0], input_ids=inputs[1], labels=inputs[2]).loss.backward()
    assert logits(upcast, inputs).dtype == torch.bfloat16


def test_copy_and_pickle_after_a_training_step(inputs):
    """Copying a model right after a training step (best-model snapshots, EMA) works: no layer keeps a tensor of the
    last forward, so copies and pickles carry no activations."""
    import pickle

    base = make_base()
    model = get_peft_model(base, adapter_config(base.config))
    model.train()
    model(pixel_values=inputs[0], input_ids=inputs[1], labels=inputs[2]).loss.backward()
    model.eval()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(logits(twin, inputs), logits(model, inputs), rtol=0, atol=0)
    layer = pickle.loads(pickle.dumps(model.get_base_model().vision_model.encoder.layer[1].mlp))
    assert not [value for value in vars(layer).values() if isinstance(value, torch.Tensor)]
    twin.unload()
    assert detris_layers(model) and not detris_layers(twin)  # unloading the copy leaves the original alone
    logits(model, inputs)


def test_peft_status_helpers(inputs):
    base = make_base()
    model = get_peft_model(base, adapter_config(base.config))
    layers = model.get_layer_status()
    assert {layer.name for layer in layers if layer.module_type != "ModulesToSaveWrapper"} == {
        "model.vision_model.encoder.layer.1.mlp",
        "model.vision_model.encoder.layer.3.mlp",
        "model.text_model.text_model.encoder.layers.1.mlp",
        "model.text_model.text_model.encoder.layers.2.mlp",
    }
    status = model.get_model_status()
    assert status.base_model_type == "DetrisForReferringSegmentation"
    assert status.adapter_model_type == "DetrisAdapterModel"
    assert status.available_adapters == ["default"] and status.merged_adapters == []


# ----- peft's generic API, as its common tests use it -----------------------------------------------------------
def test_functional_api_inject_and_state_dict_round_trip(inputs):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    source = make_base()
    inject_adapter_in_model(adapter_config(source.config, modules_to_save=None), source)
    with torch.no_grad():  # adapter statistics only: the head is not part of this adapter
        for name, buffer in source.named_buffers():
            if is_adapter_key(name) and "running_" in name:
                buffer.add_(torch.rand_like(buffer))
    state = get_peft_model_state_dict(source)
    assert state and all(is_adapter_key(k) and ".default." not in k for k in state)
    assert any(k.endswith("running_var") for k in state)

    target = make_base(seed=3)
    target.load_state_dict(make_base().state_dict())  # same frozen base, fresh adapters below
    inject_adapter_in_model(adapter_config(target.config, modules_to_save=None), target)
    assert not torch.equal(logits(target, inputs), logits(source, inputs))
    result = set_peft_model_state_dict(target, state)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if is_adapter_key(k)]
    torch.testing.assert_close(logits(target, inputs), logits(source, inputs), rtol=0, atol=0)


def test_save_selected_adapters_and_set_requires_grad(tmp_path, inputs):
    base = make_base()
    model = get_peft_model(base, adapter_config(base.config, modules_to_save=None))
    model.add_adapter("other", adapter_config(base.config, modules_to_save=None, text_adapter_layers=[0]))
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    model.base_model.set_requires_grad("other", requires_grad=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".other." in n for n in trainable) and any(".default." in n for n in trainable)
    model.base_model.set_requires_grad("default", requires_grad=False)
    assert all(".other." in n for n, p in model.named_parameters() if p.requires_grad)
