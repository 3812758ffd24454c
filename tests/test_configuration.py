import pytest

from configuration_detris import DetrisConfig
from transformers import AutoConfig


def test_defaults_are_detris_b():
    config = DetrisConfig()
    assert config.vision_config.hidden_size == 768 and config.vision_config.num_hidden_layers == 12
    assert config.vision_config.num_register_tokens == 4 and config.vision_config.layer_norm_eps == 1e-6
    assert config.text_config.hidden_size == 512 and config.text_config.hidden_act == "quick_gelu"
    assert config.vision_adapter_layers == [1, 3, 5, 7, 9, 11] and config.vision_adapter_dim == 128
    assert config.text_adapter_layers == [1, 3, 5, 7, 9, 11] and config.text_adapter_dim == 64
    assert config.neck_tap_layers == [4, 8]
    assert (config.adapter_scale, config.word_len, config.input_size, config.mask_threshold) == (0.2, 17, 448, 0.35)
    assert config.grid_size == 32 and config.num_prefix_tokens == 5


@pytest.mark.parametrize(
    "name, depth, width, vision_layers, text_layers, dim, taps",
    [
        ("base", 12, 768, [1, 3, 5, 7, 9, 11], [1, 3, 5, 7, 9, 11], 128, [4, 8]),
        ("detris-l", 24, 1024, [2, 6, 10, 14, 18, 22], [1, 3, 5, 7, 9, 11], 128, [8, 16]),
        ("detris-l*", 24, 1024, list(range(1, 24)), list(range(1, 12)), 384, [8, 16]),
    ],
)
def test_presets(name, depth, width, vision_layers, text_layers, dim, taps):
    config = DetrisConfig.from_preset(name)
    assert config.vision_config.num_hidden_layers == depth and config.vision_config.hidden_size == width
    assert config.vision_adapter_layers == vision_layers and config.text_adapter_layers == text_layers
    assert config.vision_adapter_dim == dim and config.neck_tap_layers == taps
    assert config.vision_adapter_attention_dim == 128


def test_round_trip_through_auto_config(tmp_path):
    config = DetrisConfig.from_preset("large-mixed", word_len=22)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DetrisConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.vision_adapter_layers == list(range(1, 24)) and loaded.word_len == 22


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(vision_adapter_layers=[1, 12]), r"\[12\] outside the encoder's \[0, 11\]"),
        (dict(text_adapter_layers=[-1]), r"\[-1\] outside"),
        (dict(neck_tap_layers=[4, 8, 10]), "exactly 2"),
        (dict(input_size=450), "multiple of the patch size 14, got 450"),
        (dict(word_len=78), r"word_len must be in \[2, 77\].*got 78"),
        (dict(word_len=1), "got 1"),
        (dict(vision_adapter_dim=100), "multiple of 16.*got 100"),
        (dict(mask_threshold=1.5), "mask_threshold must be in"),
        (dict(adapter_init="random"), "adapter_init must be one of"),
        (dict(fusion_hidden_size=510), "divisible"),
        (dict(vision_adapter_layers=[1, 1]), "twice"),
        (dict(fusion_hidden_size=0), "fusion_hidden_size must be a positive integer, got 0"),
        (dict(decoder_ffn_dim=-8), "decoder_ffn_dim must be a positive integer, got -8"),
        (dict(projector_hidden_size=-1), "projector_hidden_size must be a positive integer"),
        (dict(adapter_scale=float("nan")), "adapter_scale must be a finite number, got nan"),
        (dict(adapter_batch_norm_eps=-1e-3), "adapter_batch_norm_eps must be a positive finite number, got -0.001"),
        (dict(head_batch_norm_eps=-1e-5), "head_batch_norm_eps must be a positive finite number"),
        (dict(head_layer_norm_eps=0.0), "head_layer_norm_eps must be a positive finite number"),
    ],
)
def test_invalid_settings_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        DetrisConfig(**overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown DETRIS preset 'huge'"):
        DetrisConfig.from_preset("huge")


def test_adapter_fields_are_declared_once_and_only_checked_when_built_in():
    from configuration_detris import DetrisAdapterSettings
    from modeling_detris import DetrisAdapterConfig

    names = DetrisAdapterSettings.adapter_field_names()
    assert "adapter_scale" in names and "adapter_init" in names
    assert issubclass(DetrisConfig, DetrisAdapterSettings) and issubclass(DetrisAdapterConfig, DetrisAdapterSettings)
    assert DetrisAdapterConfig.from_model_config(DetrisConfig.from_preset("large")).adapter_settings() == (
        DetrisConfig.from_preset("large").adapter_settings()
    )
    # a bare base (no adapters built in) does not validate adapter settings it does not use
    assert DetrisConfig(adapters_in_model=False, vision_adapter_layers=[40]).vision_adapter_layers == [40]
