"""Configuration of DETRIS (Densely Connected Parameter-Efficient Tuning for Referring Image Segmentation).

A DETRIS model is a frozen DINOv2-with-registers vision encoder and a frozen CLIP text encoder, small trainable
adapters inside both (Dense Aligners on the vision MLPs, text adapters beside the text MLPs), and a trainable
neck / decoder / projector head that predicts a mask at a quarter of the input resolution.
"""

import copy
import math
from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import CLIPTextConfig, Dinov2WithRegistersConfig, PreTrainedConfig

# DINOv2 ViT-B/14 and ViT-L/14 with 4 registers, as DETRIS builds them (pretrain grid 37x37 = 518 px).
DINOV2_REG4_BASE = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    num_register_tokens=4,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    qkv_bias=True,
    use_swiglu_ffn=False,
    drop_path_rate=0.0,
)
DINOV2_REG4_LARGE = dict(DINOV2_REG4_BASE, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)

# OpenAI CLIP ViT-B/16 text tower.
CLIP_B16_TEXT = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=0,
)

ODD_LAYERS_12 = [1, 3, 5, 7, 9, 11]

# The official configurations (docs/release.md, "The three configurations").
PRESETS = {
    "base": dict(
        vision_config=DINOV2_REG4_BASE,
        text_config=CLIP_B16_TEXT,
        vision_adapter_layers=ODD_LAYERS_12,
        vision_adapter_dim=128,
        text_adapter_layers=ODD_LAYERS_12,
        text_adapter_dim=64,
        neck_tap_layers=[4, 8],
    ),
    "large": dict(
        vision_config=DINOV2_REG4_LARGE,
        text_config=CLIP_B16_TEXT,
        vision_adapter_layers=[2, 6, 10, 14, 18, 22],
        vision_adapter_dim=128,
        text_adapter_layers=ODD_LAYERS_12,
        text_adapter_dim=64,
        neck_tap_layers=[8, 16],
    ),
    # DETRIS-L*: the mixed-data release, adapters of width 384 on every layer but the first.
    "large-mixed": dict(
        vision_config=DINOV2_REG4_LARGE,
        text_config=CLIP_B16_TEXT,
        vision_adapter_layers=list(range(1, 24)),
        vision_adapter_dim=384,
        text_adapter_layers=list(range(1, 12)),
        text_adapter_dim=384,
        neck_tap_layers=[8, 16],
    ),
}
PRESET_ALIASES = {"detris-b": "base", "detris-l": "large", "detris-l*": "large-mixed", "detris-l-mixed": "large-mixed"}

ADAPTER_INIT_MODES = ("official", "zeros")


@dataclass
class DetrisAdapterSettings:
    r"""
    The fields that describe the DETRIS adapters, declared once: [`DetrisConfig`] (adapters built into the model) and
    the PEFT method's `DetrisAdapterConfig` (adapters loaded onto a base) both inherit them and their checks.

    Args:
        vision_adapter_layers (`list[int]`): 0-based vision blocks that get a Dense Aligner on their MLP.
        vision_adapter_dim (`int`): Dense Aligner bottleneck width `a` (multiple of 16).
        vision_adapter_attention_dim (`int`): width of the Dense Aligner's cross-attention to the words (128).
        vision_adapter_attention_heads (`int`): heads of that cross-attention (8).
        vision_adapter_attention_dropout (`float`): dropout on its attention weights during training (0.1).
        text_adapter_layers (`list[int]`): 0-based text layers that get a text adapter.
        text_adapter_dim (`int`): text adapter bottleneck width `t` (multiple of 16).
        adapter_scale (`float`): factor on every adapter output (0.2).
        adapter_init (`str`): `"official"` reproduces the official initialisation (adapters active from step 0);
            `"zeros"` zeroes each adapter's output projection so a fresh adapter starts as a no-op.
        adapter_batch_norm_eps (`float`): BatchNorm eps inside the adapters (1e-3).
    """

    vision_adapter_layers: list[int] | tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    vision_adapter_dim: int = 128
    vision_adapter_attention_dim: int = 128
    vision_adapter_attention_heads: int = 8
    vision_adapter_attention_dropout: float = 0.1
    text_adapter_layers: list[int] | tuple[int, ...] = (1, 3, 5, 7, 9, 11)
    text_adapter_dim: int = 64
    adapter_scale: float = 0.2
    adapter_init: str = "official"
    adapter_batch_norm_eps: float = 1e-3

    @staticmethod
    def adapter_field_names() -> tuple[str, ...]:
        """The names of the adapter fields, in declaration order."""
        return tuple(DetrisAdapterSettings.__dataclass_fields__)

    def adapter_settings(self) -> dict:
        """The adapter fields of this config as a dict (copies)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in self.adapter_field_names()}

    def check_adapter_settings(self, vision_depth: int | None = None, text_depth: int | None = None):
        """Raise a `ValueError` naming the field, the value and what is expected for any bad adapter setting; the
        layer indices are checked against the encoder depths when those are given."""
        for name, depth in (("vision_adapter_layers", vision_depth), ("text_adapter_layers", text_depth)):
            check_layer_indices(name, getattr(self, name), depth)
        for name in ("vision_adapter_dim", "text_adapter_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value % 16:
                raise ValueError(f"{name} must be a positive multiple of 16 (its dense branches use a/2, a/4, a/16), got {value!r}")
        check_heads("vision_adapter_attention_dim", self.vision_adapter_attention_dim, self.vision_adapter_attention_heads)
        if not 0.0 <= self.vision_adapter_attention_dropout < 1.0:
            raise ValueError(f"vision_adapter_attention_dropout must be in [0, 1), got {self.vision_adapter_attention_dropout}")
        if not math.isfinite(self.adapter_scale):
            raise ValueError(f"adapter_scale must be a finite number, got {self.adapter_scale}")
        if self.adapter_init not in ADAPTER_INIT_MODES:
            raise ValueError(f"adapter_init must be one of {ADAPTER_INIT_MODES}, got {self.adapter_init!r}")
        check_positive("adapter_batch_norm_eps", self.adapter_batch_norm_eps)


@strict(accept_kwargs=True)
class DetrisConfig(DetrisAdapterSettings, PreTrainedConfig):
    r"""
    Configuration of a [`DetrisForReferringSegmentation`] model. The defaults give DETRIS-B; use
    [`DetrisConfig.from_preset`] for `"base"`, `"large"` and `"large-mixed"` (DETRIS-L*).

    Args:
        vision_config (`dict` or `Dinov2WithRegistersConfig`): the frozen DINOv2-with-registers encoder.
        text_config (`dict` or `CLIPTextConfig`): the frozen CLIP text encoder (with projection).
        vision_adapter_layers, vision_adapter_dim, vision_adapter_attention_dim, vision_adapter_attention_heads,
        vision_adapter_attention_dropout, text_adapter_layers, text_adapter_dim, adapter_scale, adapter_init,
        adapter_batch_norm_eps: the adapters, see [`DetrisAdapterSettings`].
        adapters_in_model (`bool`): build the adapters inside the model at construction. Set `False` to get the bare
            backbones + head, e.g. as the base model of the PEFT workflow (the adapter fields are then not checked).
        neck_tap_layers (`list[int]`): two 0-based vision blocks whose raw outputs (no final norm) feed the neck,
            beside the final normed output.
        fusion_hidden_size (`int`): channel width of the neck, decoder and projector input (512).
        neck_num_attention_heads (`int`): heads of the neck's text gates (8).
        decoder_num_layers (`int`): transformer decoder layers (3).
        decoder_num_attention_heads (`int`): decoder heads (8).
        decoder_ffn_dim (`int`): decoder feed-forward width (512).
        decoder_dropout (`float`): decoder dropout (0.1).
        projector_hidden_size (`int`): channels of the projector's upsampled map (256).
        projector_kernel_size (`int`): size of the per-sample dynamic kernel (3).
        head_batch_norm_eps (`float`): BatchNorm eps in the neck and projector (1e-5).
        head_layer_norm_eps (`float`): LayerNorm eps in the decoder (1e-5).
        word_len (`int`): the fixed text length (17; 22 for G-Ref umd). Inputs must have exactly this length.
        input_size (`int`): side of the square letterboxed input image (448, a multiple of the patch size).
        mask_threshold (`float`): probability threshold of the binary mask (0.35).
        dice_loss_weight (`float`): weight of a soft Dice term added to the training loss. 0 (the default) is the
            official BCE-only loss; small from-scratch heads on small targets (the RefShapes demo) learn much faster
            with 1.0.
        initializer_range (`float`): std of the normal init of the backbones' linear layers.
    """

    model_type = "detris"
    sub_configs_defaults = {"vision_config": Dinov2WithRegistersConfig, "text_config": CLIPTextConfig}

    vision_config: dict | Dinov2WithRegistersConfig | None = None
    text_config: dict | CLIPTextConfig | None = None

    adapters_in_model: bool = True

    neck_tap_layers: list[int] | tuple[int, ...] = (4, 8)
    fusion_hidden_size: int = 512
    neck_num_attention_heads: int = 8
    decoder_num_layers: int = 3
    decoder_num_attention_heads: int = 8
    decoder_ffn_dim: int = 512
    decoder_dropout: float = 0.1
    projector_hidden_size: int = 256
    projector_kernel_size: int = 3
    head_batch_norm_eps: float = 1e-5
    head_layer_norm_eps: float = 1e-5

    word_len: int = 17
    input_size: int = 448
    mask_threshold: float = 0.35
    dice_loss_weight: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = dict(DINOV2_REG4_BASE)
        if self.text_config is None:
            self.text_config = dict(CLIP_B16_TEXT)
        if isinstance(self.vision_config, dict):
            self.vision_config = Dinov2WithRegistersConfig(**self.vision_config)
        if isinstance(self.text_config, dict):
            self.text_config = CLIPTextConfig(**self.text_config)
        self.vision_adapter_layers = [int(i) for i in self.vision_adapter_layers]
        self.text_adapter_layers = [int(i) for i in self.text_adapter_layers]
        self.neck_tap_layers = [int(i) for i in self.neck_tap_layers]
        super().__post_init__(**kwargs)
        self.check_detris_settings()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DetrisConfig":
        """The official configuration `name` (`"base"`, `"large"`, `"large-mixed"`, or `"detris-b"`, `"detris-l"`,
        `"detris-l*"`), with any field overridden by keyword (e.g. `word_len=22`)."""
        key = PRESET_ALIASES.get(name.lower(), name.lower())
        if key not in PRESETS:
            raise ValueError(f"unknown DETRIS preset {name!r}; expected one of {sorted(PRESETS) + sorted(PRESET_ALIASES)}")
        settings = copy.deepcopy(PRESETS[key])
        for sub in ("vision_config", "text_config"):
            if isinstance(overrides.get(sub), dict):
                settings[sub].update(overrides.pop(sub))
        settings.update(overrides)
        return cls(**settings)

    @property
    def grid_size(self) -> int:
        """Side of the square patch grid (32 for a 448 input and patch 14)."""
        return self.input_size // self.vision_config.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens in front of the patch tokens (5 for DINOv2-reg4)."""
        return 1 + self.vision_config.num_register_tokens

    def check_detris_settings(self):
        """Raise a `ValueError` naming the field, the value and the allowed range for any inconsistent setting."""
        vision_depth = self.vision_config.num_hidden_layers
        patch = self.vision_config.patch_size
        if self.adapters_in_model:
            self.check_adapter_settings(vision_depth, self.text_config.num_hidden_layers)
        check_layer_indices("neck_tap_layers", self.neck_tap_layers, vision_depth)
        if len(self.neck_tap_layers) != 2:
            raise ValueError(f"neck_tap_layers must name exactly 2 vision blocks, got {self.neck_tap_layers}")
        for name in ("fusion_hidden_size", "neck_num_attention_heads", "decoder_num_layers", "decoder_num_attention_heads",
                     "decoder_ffn_dim", "projector_hidden_size", "projector_kernel_size", "input_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.input_size % patch:
            raise ValueError(f"input_size must be a positive multiple of the patch size {patch}, got {self.input_size}")
        max_len = self.text_config.max_position_embeddings
        if not 2 <= self.word_len <= max_len:
            raise ValueError(f"word_len must be in [2, {max_len}] (SOT + EOT up to the text position table), got {self.word_len}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1), got {self.mask_threshold}")
        if not self.dice_loss_weight >= 0.0:
            raise ValueError(f"dice_loss_weight must be >= 0, got {self.dice_loss_weight}")
        check_heads("fusion_hidden_size", self.fusion_hidden_size, self.neck_num_attention_heads)
        check_heads("fusion_hidden_size", self.fusion_hidden_size, self.decoder_num_attention_heads)
        if self.fusion_hidden_size % 4:
            raise ValueError(f"fusion_hidden_size must be a multiple of 4 (2-D sine position codes), got {self.fusion_hidden_size}")
        if self.projector_kernel_size % 2 == 0:
            raise ValueError(f"projector_kernel_size must be a positive odd number, got {self.projector_kernel_size}")
        if not 0.0 <= self.decoder_dropout < 1.0:
            raise ValueError(f"decoder_dropout must be in [0, 1), got {self.decoder_dropout}")
        for name in ("head_batch_norm_eps", "head_layer_norm_eps", "initializer_range"):
            check_positive(name, getattr(self, name))

    def validate_architecture(self):
        super().validate_architecture()
        self.check_detris_settings()


def check_layer_indices(name: str, layers, depth: int | None):
    """`layers` must be distinct integer block indices, inside `[0, depth)` when `depth` is given."""
    if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise ValueError(f"{name} must be a list of integer block indices, got {list(layers)!r}")
    if depth is not None:
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"{name} has layer indices {bad} outside the encoder's [0, {depth - 1}] ({depth} layers)")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} lists a block twice: {list(layers)}")


def check_heads(name: str, width: int, heads: int):
    if heads < 1 or width < 1 or width % heads:
        raise ValueError(f"{name} ({width}) must be a positive multiple of the number of attention heads ({heads}): divisible by it")


def check_positive(name: str, value: float):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


__all__ = ["ADAPTER_INIT_MODES", "DetrisAdapterSettings", "DetrisConfig", "PRESETS", "PRESET_ALIASES"]
