"""DETRIS for referring image segmentation, as a transformers `PreTrainedModel`.

Data flow (ARCHITECTURE.md §1.1): the CLIP text encoder runs first (with its text adapters) and gives word features
[B, L, 512] and a sentence feature [B, 512]; the DINOv2 encoder then runs with a Dense Aligner in selected blocks,
each attending to the same final word features; three taps of the vision encoder go through the text-gated neck, the
decoder (which attends to the words, pads masked) and the projector, which outputs mask logits at a quarter of the
input resolution: [B, 1, 128, 128] for a 448 x 448 input.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModelWithProjection, Dinov2WithRegistersModel, PreTrainedModel
from transformers import initialization as init
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersEmbeddings
from transformers.utils import ModelOutput

from configuration_detris import DetrisConfig

from .adapters import DenseAligner, TextAdapter
from .attention import PackedMultiheadAttention
from .heads import DetrisDecoder, DetrisNeck, DetrisProjector, TextGate
from .low_precision import low_precision_emulation
from .peft_detris import DetrisAdapterConfig
from .tuner_layers import DenseAlignerLayer, DetrisTunerLayer

# Keys a DetrisProcessor output may carry besides the model inputs; the forward accepts and ignores them so that
# `model(**processor(...))` works.
PROCESSOR_METADATA_KEYS = frozenset({"attention_mask", "original_sizes", "inverse_affines", "affines", "target_sizes"})


@dataclass
class DetrisSegmentationOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
        Mean binary cross-entropy between the logits and the labels resized (nearest) to the logits' size.
    logits (`torch.FloatTensor` of shape `(batch_size, 1, 4 * G, 4 * G)`):
        Mask logits before the sigmoid, G = input_size / patch_size (`[B, 1, 128, 128]` for a 448 input). Use
        `processor.post_process_referring_segmentation` to get boolean masks at the original image sizes.
    text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        Sentence feature: the final-norm EOT token times the text projection.
    word_features (`torch.FloatTensor` of shape `(batch_size, word_len, text_hidden_size)`):
        Final-norm text features of every token (what the Dense Aligners and the decoder attend to).
    vision_features (`tuple(torch.FloatTensor)`, 3 x `(batch_size, vision_hidden_size, G, G)`):
        The neck inputs: the raw outputs of the two tap blocks and the final-norm output, patch tokens only.
    neck_output (`torch.FloatTensor` of shape `(batch_size, fusion_hidden_size, G, G)`)
    decoder_output (`torch.FloatTensor` of shape `(batch_size, fusion_hidden_size, G, G)`)
    vision_hidden_states (`tuple(torch.FloatTensor)`, *optional*, with `output_hidden_states=True`):
        Every vision block's output (embeddings first), all tokens.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    word_features: torch.FloatTensor | None = None
    vision_features: tuple[torch.FloatTensor, ...] | None = None
    neck_output: torch.FloatTensor | None = None
    decoder_output: torch.FloatTensor | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None


# CLIP's initial contrastive temperature, log(1 / 0.07)
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)


class DetrisVisionEmbeddings(Dinov2WithRegistersEmbeddings):
    """DINOv2 embeddings with the original position-embedding interpolation.

    transformers resizes the pretrained 37x37 table with `size=(h, w)` and antialiasing; the original DINOv2 code
    (and so DETRIS) uses bicubic with `scale_factor=(h + 0.1) / 37` and no antialiasing, which gives different
    values. The table is returned unchanged when the grid already matches (518 px input).
    """

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        num_patches = embeddings.shape[1] - 1
        num_positions = self.position_embeddings.shape[1] - 1
        if num_patches == num_positions and height == width:
            return self.position_embeddings
        side = int(math.sqrt(num_positions))
        patch_h, patch_w = self.patch_embeddings.patch_size
        rows, cols = height // patch_h, width // patch_w
        dim = embeddings.shape[-1]
        target_dtype = self.position_embeddings.dtype
        table = self.position_embeddings.float()
        patch_table = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        patch_table = F.interpolate(
            patch_table,
            scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
            mode="bicubic",
            antialias=False,
        )
        if patch_table.shape[-2:] != (rows, cols):
            raise ValueError(f"position-embedding interpolation gave a {tuple(patch_table.shape[-2:])} grid, expected {(rows, cols)}")
        patch_table = patch_table.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
        return torch.cat([table[:, :1], patch_table], dim=1).to(target_dtype)


class DetrisPreTrainedModel(PreTrainedModel):
    config: DetrisConfig
    base_model_prefix = "detris"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # The loss is a per-pixel mean; `Trainer` must not pass `num_items_in_batch` (it would for any forward with
    # **kwargs, which ours has only to accept processor metadata).
    accepts_loss_kwargs = False
    _supports_sdpa = True
    _no_split_modules = ["Dinov2WithRegistersLayer", "CLIPEncoderLayer", "DetrisDecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        """PyTorch's default initialisation for the head (what the official code trains from)."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, (PackedMultiheadAttention, TextGate)):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
            init.zeros_(module.out_proj.bias)
        if module is self and isinstance(getattr(module, "logit_scale", None), nn.Parameter):
            init.constant_(module.logit_scale, CLIP_LOGIT_SCALE_INIT)

    @torch.no_grad()
    def initialize_weights(self):
        # Adapters sit inside the backbones, whose own `_init_weights` would otherwise initialise them: give them the
        # official adapter init first and mark them done, so the backbones' init skips them.
        init_mode = getattr(self.config, "adapter_init", "official")
        for module in self.modules():
            if isinstance(module, (DenseAligner, TextAdapter)) and not getattr(module, "_is_hf_initialized", False):
                module.reset_parameters(init_mode)
                for sub in module.modules():
                    sub._is_hf_initialized = True
        super().initialize_weights()


class DetrisForReferringSegmentation(DetrisPreTrainedModel):
    """DETRIS: frozen DINOv2-reg4 + CLIP text encoders with Dense Aligners / text adapters and a neck-decoder-projector
    head. Only the adapters and the head are trainable."""

    def __init__(self, config: DetrisConfig):
        super().__init__(config)
        self.vision_model = Dinov2WithRegistersModel._from_config(config.vision_config)
        self.vision_model.embeddings = DetrisVisionEmbeddings(config.vision_config)
        self.text_model = CLIPTextModelWithProjection._from_config(config.text_config)
        self.neck = DetrisNeck(config)
        self.decoder = DetrisDecoder(config)
        self.projector = DetrisProjector(config)
        # CLIP's contrastive temperature: unused by DETRIS, kept (frozen) so a converted official checkpoint keeps
        # every one of its tensors and the parameter counts match the official ones.
        self.logit_scale = nn.Parameter(torch.tensor(CLIP_LOGIT_SCALE_INIT), requires_grad=False)
        self._check_head_widths(config)
        if config.adapters_in_model:
            self.add_detris_adapters(config)
        self.freeze_backbones()
        self.post_init()

    @staticmethod
    def _check_head_widths(config):
        if config.text_config.hidden_size != config.fusion_hidden_size:
            raise ValueError(
                f"the decoder attends to the word features, so text_config.hidden_size "
                f"({config.text_config.hidden_size}) must equal fusion_hidden_size ({config.fusion_hidden_size})"
            )

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Loading replaces the parameters (and their requires_grad flags): re-apply the freezing rule.
        model = super().from_pretrained(*args, **kwargs)
        if isinstance(model, DetrisForReferringSegmentation):
            model.freeze_backbones()
        return model

    @classmethod
    def from_backbones(
        cls,
        vision_model_name_or_path: str = "facebook/dinov2-with-registers-base",
        text_model_name_or_path: str = "openai/clip-vit-base-patch16",
        config: DetrisConfig | None = None,
        **config_overrides,
    ) -> "DetrisForReferringSegmentation":
        """A new DETRIS for training: pretrained DINOv2-with-registers and CLIP text backbones (Hub ids or local
        folders in the transformers layout), fresh adapters and head. The adapter / head settings come from `config`
        (default: the DETRIS-B or DETRIS-L preset, chosen by the vision depth) and `config_overrides`; the backbone
        configs always come from the checkpoints. The 37x37 DINOv2 position table is kept and interpolated the
        original way at run time, exactly as for converted official checkpoints."""
        vision = Dinov2WithRegistersModel.from_pretrained(vision_model_name_or_path)
        text = CLIPTextModelWithProjection.from_pretrained(text_model_name_or_path)
        if config is None:
            config = DetrisConfig.from_preset("large" if vision.config.num_hidden_layers == 24 else "base")
        settings = config.to_dict()
        for key in ("vision_config", "text_config", "model_type", "transformers_version", "architectures"):
            settings.pop(key, None)
        settings.update(config_overrides)
        config = DetrisConfig(vision_config=vision.config.to_dict(), text_config=text.config.to_dict(), **settings)
        model = cls(config)
        _copy_backbone_weights(model.vision_model, vision.state_dict(), vision_model_name_or_path)
        _copy_backbone_weights(model.text_model, text.state_dict(), text_model_name_or_path)
        return model

    # ----- adapters and freezing -------------------------------------------------------------------------------
    def add_detris_adapters(self, config: DetrisConfig, adapter_name: str = "default"):
        """Wrap the MLPs of the configured vision / text layers with DETRIS adapter layers. This runs the DETRIS PEFT
        tuner (`peft.inject_adapter_in_model` with `DetrisAdapterConfig.from_model_config(config)`), so the layers
        and keys are exactly those `get_peft_model(..., DetrisAdapterConfig(...))` builds. The built-in adapters are
        part of the architecture, not a loaded PEFT adapter: the trainability of the other parameters is kept and no
        `peft_config` is left on the model."""
        from peft import inject_adapter_in_model

        peft_config = DetrisAdapterConfig.from_model_config(config, modules_to_save=None)
        requires_grad = {name: param.requires_grad for name, param in self.named_parameters()}
        had_peft_config = "peft_config" in self.__dict__
        inject_adapter_in_model(peft_config, self, adapter_name)
        if not had_peft_config:
            self.__dict__.pop("peft_config", None)
        for name, param in self.named_parameters():
            if name in requires_grad:
                param.requires_grad_(requires_grad[name])
            elif ".mlp.base_layer." in name:
                param.requires_grad_(requires_grad.get(name.replace(".mlp.base_layer.", ".mlp."), param.requires_grad))

    def freeze_backbones(self):
        """Freeze every backbone parameter that is not part of an adapter (the official rule)."""
        for backbone in (self.vision_model, self.text_model):
            for name, param in backbone.named_parameters():
                param.requires_grad_(".detris_" in name)
        self.logit_scale.requires_grad_(False)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        result = super().set_attn_implementation(attn_implementation, *args, **kwargs)
        implementation = "eager" if self.config._attn_implementation == "eager" else "sdpa"
        for module in self.modules():
            if isinstance(module, PackedMultiheadAttention):
                module.attn_implementation = implementation
        return result

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    # ----- forward ---------------------------------------------------------------------------------------------
    def _check_inputs(self, pixel_values, input_ids, labels):
        size = self.config.input_size
        if pixel_values is None or input_ids is None:
            raise ValueError("DETRIS needs both `pixel_values` and `input_ids`")
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must have shape [batch, 3, {size}, {size}] (letterboxed by DetrisProcessor), "
                f"got {list(pixel_values.shape)}"
            )
        word_len = self.expected_word_len()
        if input_ids.ndim != 2 or input_ids.shape[1] != word_len:
            raise ValueError(
                f"input_ids must have shape [batch, word_len={word_len}] (the model's fixed text length), "
                f"got {list(input_ids.shape)}"
            )
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values and input_ids must have the same batch size, got {pixel_values.shape[0]} and {input_ids.shape[0]}"
            )
        if labels is not None and labels.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"labels must have batch size {pixel_values.shape[0]}, got shape {list(labels.shape)}")

    def expected_word_len(self) -> int:
        """The text length inputs must have: the `word_len` recorded by the active PEFT adapter when it has one (one base
        model can serve the adapters of several datasets, e.g. G-Ref umd's with 22 tokens beside RefCOCO's with 17),
        else `config.word_len`."""
        configs = self.__dict__.get("peft_config")
        if configs:
            for module in self.modules():
                if isinstance(module, DetrisTunerLayer):
                    if module.disable_adapters:
                        break
                    lengths = {getattr(configs.get(name), "word_len", None) for name in module.active_adapters} - {None}
                    if len(lengths) == 1:
                        return lengths.pop()
                    break
        return self.config.word_len

    def encode_text(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Word features [B, L, D_t] (after the final norm, no padding mask) and sentence features [B, P]
        (the EOT token, found as the argmax of the ids as in the original code, times the projection)."""
        words = self.text_model.text_model(input_ids=input_ids).last_hidden_state
        eot = input_ids.argmax(dim=-1)
        pooled = words[torch.arange(words.shape[0], device=words.device), eot]
        return words, self.text_model.text_projection(pooled)

    def encode_image(self, pixel_values, word_features, output_hidden_states=False):
        for module in self.vision_model.modules():
            if isinstance(module, DenseAlignerLayer):
                module.set_word_features(word_features)
        outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        hidden_states = outputs.hidden_states
        prefix = self.config.num_prefix_tokens
        grid = self.config.grid_size
        taps = [hidden_states[i + 1] for i in self.config.neck_tap_layers] + [outputs.last_hidden_state]
        # [B, G*G, D] tokens viewed as [B, D, G, G] channels-last maps (no copy); the head's convolutions keep that layout
        features = tuple(tap[:, prefix:].unflatten(1, (grid, grid)).permute(0, 3, 1, 2) for tap in taps)
        return features, (hidden_states if output_hidden_states else None)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DetrisSegmentationOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, input_size, input_size)`):
            Letterboxed, CLIP-normalised images (see `DetrisProcessor`).
        input_ids (`torch.LongTensor` of shape `(batch_size, word_len)`):
            CLIP BPE ids, SOT ... EOT, padded with 0 to exactly `config.word_len`. Pads are not masked in the text
            encoder or the adapters (as in the official model); the decoder masks them (`input_ids == 0`).
        labels (`torch.FloatTensor` of shape `(batch_size, input_size, input_size)` or with a channel dim of 1):
            Target masks in [0, 1] at the input size; they are resized (nearest) to the logits' size for the BCE.
        """
        unknown = set(kwargs) - PROCESSOR_METADATA_KEYS
        if unknown:
            raise TypeError(f"forward() got unexpected arguments {sorted(unknown)}")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_inputs(pixel_values, input_ids, labels)
        pixel_values = pixel_values.to(self.dtype)

        # bf16 / fp16 on a CPU without native support: fp32 accumulation inside matmuls and convolutions (no-op otherwise)
        with low_precision_emulation(pixel_values.device, self.dtype):
            word_features, text_embeds = self.encode_text(input_ids)
            vision_features, vision_hidden_states = self.encode_image(pixel_values, word_features, output_hidden_states)
            neck_output = self.neck(vision_features, text_embeds)
            decoder_output = self.decoder(neck_output, word_features, word_padding_mask=input_ids == 0)
            logits = self.projector(decoder_output, text_embeds)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels)

        output = DetrisSegmentationOutput(
            loss=loss,
            logits=logits,
            text_embeds=text_embeds,
            word_features=word_features,
            vision_features=vision_features,
            neck_output=neck_output,
            decoder_output=decoder_output,
            vision_hidden_states=vision_hidden_states,
        )
        return output if return_dict else output.to_tuple()

    def loss_function(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Official loss: BCE-with-logits against the target mask resized (nearest) to the logits' size; plus
        `config.dice_loss_weight` times the mean soft Dice loss per sample when that weight is not 0."""
        if labels.ndim == 3:
            labels = labels[:, None]
        if labels.ndim != 4 or labels.shape[1] != 1:
            raise ValueError(f"labels must have shape [batch, H, W] or [batch, 1, H, W], got {list(labels.shape)}")
        target = F.interpolate(labels.to(logits.dtype), size=logits.shape[-2:], mode="nearest").float()
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        if self.config.dice_loss_weight:
            loss = loss + self.config.dice_loss_weight * soft_dice_loss(logits.float(), target)
        return loss


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over samples of 1 - (2 |p t| + s) / (|p| + |t| + s), with p = sigmoid(logits)."""
    probs = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    overlap = (probs * target).sum(1)
    return (1 - (2 * overlap + smooth) / (probs.sum(1) + target.sum(1) + smooth)).mean()


def _copy_backbone_weights(target: nn.Module, source: dict[str, torch.Tensor], origin: str):
    """Copy a pretrained backbone's weights into ours, where adapted MLPs live under `mlp.base_layer.`."""
    target_state = target.state_dict()
    filled, unexpected = set(), []
    for name, tensor in source.items():
        candidates = [name, name.replace(".mlp.", ".mlp.base_layer.", 1)]
        match = next((c for c in candidates if c in target_state), None)
        if match is None:
            unexpected.append(name)
            continue
        if target_state[match].shape != tensor.shape:
            raise ValueError(f"{origin}: {name} has shape {list(tensor.shape)}, expected {list(target_state[match].shape)}")
        target_state[match].copy_(tensor)
        filled.add(match)
    missing = sorted(k for k in target_state if k not in filled and ".detris_" not in k)
    if missing or unexpected:
        raise ValueError(f"{origin} does not fit the DETRIS backbone: missing {missing[:10]}, unexpected {unexpected[:10]}")


__all__ = [
    "DetrisForReferringSegmentation",
    "DetrisPreTrainedModel",
    "DetrisSegmentationOutput",
    "DetrisVisionEmbeddings",
]
