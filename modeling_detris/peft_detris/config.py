"""Configuration of the DETRIS PEFT method (`DetrisAdapterConfig`) and its `peft_type` (`DetrisPeftType.DETRIS`).

The adapter fields (layers, widths, scale, init, BatchNorm eps) and their checks are those of
`configuration_detris.DetrisAdapterSettings`, which `DetrisConfig` inherits too: they are declared once. The adapters
always sit on the MLPs of numbered backbone blocks, so a config names *layers*, not modules: `vision_adapter_layers`
(Dense Aligners on `vision_model.encoder.layer.<i>.mlp`) and `text_adapter_layers` (text adapters on
`text_model.text_model.encoder.layers.<i>.mlp`). `target_modules` is derived from them (one regex); it is stored in
`adapter_config.json` like any PEFT method's, and a value that disagrees with the layer lists is refused.
"""

import enum
import re
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from configuration_detris import PRESET_ALIASES, PRESETS, DetrisAdapterSettings

VISION_LAYERS_PATH = "vision_model.encoder.layer"
TEXT_LAYERS_PATH = "text_model.text_model.encoder.layers"
DEFAULT_MODULES_TO_SAVE = ("neck", "decoder", "projector")


class DetrisPeftType(str, enum.Enum):
    """The PEFT type of the DETRIS adapters. peft's own `PeftType` is closed, so the method registers this member in
    peft's mappings instead (see `modeling_detris.peft_detris.register_detris_peft`). Its lower-cased value is the
    tuner prefix without the underscore, which transformers' `delete_adapter` relies on."""

    DETRIS = "DETRIS"


def target_modules_for(vision_adapter_layers, text_adapter_layers) -> str:
    """The regex (full match, from the root of a `DetrisForReferringSegmentation`) of the MLPs to wrap."""
    parts = []
    for path, layers in ((VISION_LAYERS_PATH, vision_adapter_layers), (TEXT_LAYERS_PATH, text_adapter_layers)):
        if layers:
            parts.append(rf"{re.escape(path)}\.(?:{'|'.join(str(i) for i in layers)})\.mlp")
    return "|".join(parts)


def classify_target(key: str) -> str | None:
    """`"vision"` or `"text"` for an adapted MLP's module name, None for anything else."""
    for kind, path in (("vision", VISION_LAYERS_PATH), ("text", TEXT_LAYERS_PATH)):
        if re.fullmatch(rf"{re.escape(path)}\.\d+\.mlp", key):
            return kind
    return None


@dataclass
class DetrisAdapterConfig(DetrisAdapterSettings, PeftConfig):
    """Configuration of the DETRIS adapters as a PEFT method (`peft_type="DETRIS"`).

    The adapter fields (`vision_adapter_layers`, `vision_adapter_dim`, `vision_adapter_attention_dim`,
    `vision_adapter_attention_heads`, `vision_adapter_attention_dropout`, `text_adapter_layers`, `text_adapter_dim`,
    `adapter_scale`, `adapter_init`, `adapter_batch_norm_eps`) are those of `DetrisConfig` (see
    `DetrisAdapterSettings`); their defaults are DETRIS-B's adapters (2,715,696 parameters on a DINOv2-B + CLIP-B/16
    base). Use `DetrisAdapterConfig.from_preset("base" | "large" | "large-mixed")` for the official B / L / L* sets, or
    `DetrisAdapterConfig.from_model_config(detris_config)` for the adapters a `DetrisConfig` describes. Either layer
    list may be empty, not both. `adapter_init="zeros"` makes `get_peft_model` leave the base model's outputs
    unchanged at step 0 (the usual PEFT `init_weights=True` convention); `"official"` (default) is the
    initialisation the published models were trained from.

    Args (besides the adapter fields):
        target_modules (`str`, derived): regex of the wrapped MLPs, computed from the two layer lists. Passing a
            different value is an error (change the layer lists instead).
        base_vision_hidden_size (`int`, filled in): the DINOv2 width the adapters were built for, and
        base_text_hidden_size (`int`, filled in): the CLIP text width; both are set from the base model when the
            adapters are injected and saved with them, so a saved adapter set refuses a base of another size (say a
            DETRIS-B adapter on a DETRIS-L base) with a clear message instead of a shape error.
        word_len (`int`, *optional*): the text length the adapters were trained with (17; 22 for G-Ref umd). A
            base model serves adapters of several datasets, but the Dense Aligners attend to every token, padding
            included, so the text length is part of what an adapter learned: while this adapter is active the model
            expects inputs of this length instead of the base's `config.word_len`. `None` (default): the base's.
            `split_standalone_model` (and so `detris convert --split-adapters`) records the model's.
        modules_to_save (`list[str]`): extra modules trained and saved with the adapter. Default: the DETRIS head,
            `["neck", "decoder", "projector"]`, which every DETRIS adapter set is trained with. `None` keeps the
            base model's head frozen (BatchNorm statistics included) and out of the adapter file.
    """

    base_vision_hidden_size: Optional[int] = None
    base_text_hidden_size: Optional[int] = None
    word_len: Optional[int] = None
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Derived from vision_adapter_layers / text_adapter_layers; leave it None."}
    )
    exclude_modules: Optional[Union[list[str], str]] = None
    target_parameters: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = field(default_factory=lambda: list(DEFAULT_MODULES_TO_SAVE))
    bias: str = "none"

    def __post_init__(self):
        super().__post_init__()
        # JSON gives back a plain string: always (re)set the Enum member (transformers calls `.value.lower()`).
        self.peft_type = DetrisPeftType.DETRIS
        for name in ("vision_adapter_layers", "text_adapter_layers"):
            layers = getattr(self, name)
            layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else list(layers)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(f"{name} must be a list of non-negative block indices, got {layers!r}")
            setattr(self, name, sorted(layers))
        if not self.vision_adapter_layers and not self.text_adapter_layers:
            raise ValueError("DetrisAdapterConfig needs at least one adapter layer; got empty vision_adapter_layers and text_adapter_layers")
        self.check_adapter_settings()
        if self.word_len is not None and (isinstance(self.word_len, bool) or not isinstance(self.word_len, int) or self.word_len < 2):
            raise ValueError(f"word_len must be None or an integer >= 2 (SOT + EOT), got {self.word_len!r}; DETRIS uses 17 or 22")
        if self.bias != "none":
            raise ValueError(f"DETRIS adapters have no bias option: bias must be 'none', got {self.bias!r}")
        for name in ("target_parameters", "layers_to_transform", "layers_pattern"):
            if getattr(self, name):
                raise ValueError(
                    f"DetrisAdapterConfig does not use {name} (got {getattr(self, name)!r}); choose the adapted blocks with "
                    "vision_adapter_layers / text_adapter_layers"
                )
        expected = target_modules_for(self.vision_adapter_layers, self.text_adapter_layers)
        if self.target_modules is None:
            self.target_modules = expected
        elif self.target_modules != expected:
            raise ValueError(
                f"target_modules is derived from the layer lists: expected {expected!r}, got {self.target_modules!r}; "
                "leave it None and set vision_adapter_layers / text_adapter_layers instead"
            )
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    # ----- constructors ---------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DetrisAdapterConfig":
        """The adapters of an official configuration: `"base"` (DETRIS-B), `"large"` (DETRIS-L) or `"large-mixed"`
        (DETRIS-L*), also under the aliases `"detris-b"`, `"detris-l"`, `"detris-l*"`; any field can be overridden."""
        presets = adapter_presets()
        key = PRESET_ALIASES.get(name.lower(), name.lower())
        if key not in presets:
            raise ValueError(f"unknown DETRIS preset {name!r}; expected one of {sorted(presets) + sorted(PRESET_ALIASES)}")
        return cls(**{**presets[key], **overrides})

    @classmethod
    def from_model_config(cls, detris_config, **overrides) -> "DetrisAdapterConfig":
        """The adapters described by a `DetrisConfig` (its adapter fields), e.g. to train a new adapter set of the same
        shape as a released model's on a base built with `adapters_in_model=False`."""
        return cls(**{**detris_config.adapter_settings(), **overrides})

    def to_model_config_kwargs(self) -> dict:
        """The `DetrisConfig` fields that build these adapters into a standalone model (with `word_len` when set)."""
        kwargs = self.adapter_settings()
        if self.word_len is not None:
            kwargs["word_len"] = self.word_len
        return kwargs


def adapter_presets() -> dict[str, dict]:
    """The adapter fields of the official presets, by preset name (the fields a preset leaves out keep their
    defaults)."""
    names = set(DetrisAdapterSettings.adapter_field_names())
    return {name: {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in preset.items() if k in names}
            for name, preset in PRESETS.items()}


__all__ = ["DetrisAdapterConfig", "DetrisPeftType", "adapter_presets", "classify_target", "target_modules_for"]
