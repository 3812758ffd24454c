"""DETRIS (Densely Connected Parameter-Efficient Tuning for Referring Image Segmentation) as a transformers model.

Data flow: the CLIP text encoder runs first (with its text adapters) and gives word features [B, L, 512] and a
sentence feature [B, 512]; the DINOv2-with-registers encoder then runs with a Dense Aligner in selected blocks, each
attending to those final word features (passed to every block as an argument); three taps of the vision encoder go
through the text-gated neck, the decoder (which attends to the words, pads masked) and the projector, which outputs
mask logits at a quarter of the input resolution: [B, 1, 128, 128] for a 448 x 448 input.

The file reads top to bottom: outputs, embeddings, attention, the two adapters, the backbone blocks that hold them,
the head (neck, decoder, projector), bf16 / fp16 on CPUs without native support, `DetrisPreTrainedModel` (all weight
initialisation) and `DetrisForReferringSegmentation`. It imports only torch, transformers and the DETRIS
configuration (docs/architecture.md describes the sections and the key layout).
"""

import contextlib
import functools
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import CLIPTextModelWithProjection, Dinov2WithRegistersModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPMLP, CLIPTextEmbeddings
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersEmbeddings,
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersLayerScale,
    Dinov2WithRegistersMLP,
)
from transformers.utils import ModelOutput, logging

from configuration_detris import DetrisConfig

logger = logging.get_logger(__name__)

# Keys a DetrisProcessor output may carry besides the model inputs; the forward accepts and ignores them so that
# `model(**processor(...))` works.
PROCESSOR_METADATA_KEYS = frozenset({"attention_mask", "original_sizes", "inverse_affines", "affines", "target_sizes"})

# CLIP's initial contrastive temperature, log(1 / 0.07)
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)


# ===== outputs ========================================================================================================
@dataclass
class DetrisSegmentationOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
        Mean binary cross-entropy between the logits and the labels resized (nearest) to the logits' size (plus
        `config.dice_loss_weight` times a soft Dice loss).
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
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, with `output_hidden_states`):
        Vision encoder: the embeddings and every block's output, each `(batch_size, prefix + G * G, vision_hidden_size)`
        (prefix = CLS + registers); only the selected ones when `output_hidden_states` is a list of indices.
    attentions (`tuple(torch.FloatTensor)`, *optional*, with `output_attentions`):
        Vision encoder: every block's attention weights `(batch_size, num_heads, prefix + G * G, prefix + G * G)`
        (`None` entries with the SDPA implementation, which does not compute them: use `attn_implementation="eager"`).
    text_hidden_states (`tuple(torch.FloatTensor)`, *optional*, with `output_hidden_states`):
        Text encoder: the embeddings and every layer's output, each `(batch_size, word_len, text_hidden_size)`.
    text_attentions (`tuple(torch.FloatTensor)`, *optional*, with `output_attentions`):
        Text encoder: every layer's (causal) attention weights `(batch_size, num_heads, word_len, word_len)`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    word_features: torch.FloatTensor | None = None
    vision_features: tuple[torch.FloatTensor, ...] | None = None
    neck_output: torch.FloatTensor | None = None
    decoder_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_attentions: tuple[torch.FloatTensor, ...] | None = None


# ===== embeddings =====================================================================================================
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
            patch_table, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic", antialias=False
        )
        if patch_table.shape[-2:] != (rows, cols):
            raise ValueError(f"position-embedding interpolation gave a {tuple(patch_table.shape[-2:])} grid, expected {(rows, cols)}")
        patch_table = patch_table.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
        return torch.cat([table[:, :1], patch_table], dim=1).to(target_dtype)


# ===== attention ======================================================================================================
def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Softmax attention in plain torch ops: `query` [B, H, Lq, d], `key` / `value` [B, H, Lk, d], `attention_mask`
    additive [B, 1, 1 or Lq, Lk] or None. Returns ([B, Lq, H, d], weights [B, H, Lq, Lk])."""
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.dropout(scores.softmax(dim=-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class PackedMultiheadAttention(nn.Module):
    """Multi-head attention with packed q/k/v projections, batch first, computed by transformers' attention interface
    (`config._attn_implementation`: SDPA by default, eager on request, switchable at run time).

    The parameter layout (`in_proj_weight`, `in_proj_bias`, `out_proj`) is that of `torch.nn.MultiheadAttention`,
    which the official heads and Dense Aligners use, so official weights load unchanged.
    """

    def __init__(self, config: DetrisConfig | None, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.config = config
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = dropout
        self.is_causal = False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`query` [B, Lq, E], `key`/`value` [B, Lk, E]; `key_padding_mask` [B, Lk] with True = ignore. Returns [B, Lq, E]."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._split_heads(F.linear(query, w_q, b_q))
        k = self._split_heads(F.linear(key, w_k, b_k))
        v = self._split_heads(F.linear(value, w_v, b_v))
        attention_mask = None
        if key_padding_mask is not None:
            attention_mask = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
            attention_mask = attention_mask.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
        implementation = getattr(self.config, "_attn_implementation", None) or "sdpa"
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        out, _ = attention_interface(
            self, q, k, v, attention_mask, scaling=self.scaling, dropout=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.reshape(*out.shape[:2], self.embed_dim))


# ===== the adapters: Dense Aligner (vision) and text adapter ==========================================================
# Both squeeze the token features to a bottleneck of width `a`, run a densely connected mixture of convolutions over
# the tokens (1x1 / 3x3 / 5x5 kernels, each stage seeing the input and all earlier stages: "D-MoC"), and expand back.
class ConvBatchNormReLU(nn.Sequential):
    """Conv (with bias) -> BatchNorm -> ReLU, in 1-D or 2-D."""

    def __init__(self, in_channels, out_channels, kernel_size, spatial_dims, batch_norm_eps):
        conv_cls, bn_cls = (nn.Conv1d, nn.BatchNorm1d) if spatial_dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        super().__init__()
        self.conv = conv_cls(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.bn = bn_cls(out_channels, eps=batch_norm_eps)
        self.act = nn.ReLU()


class DenseMixtureOfConvolutions(nn.Module):
    """D-MoC: three convolution branches where each later branch reads the input and all earlier branches' outputs.

    Widths for bottleneck `a`: branch 1 gives a/2; branches 2 and 3 first reduce to a/16, then give a/4 with a 3x3
    (resp. 5x5) kernel. Output: the a concatenated channels.
    """

    def __init__(self, width: int, spatial_dims: int, batch_norm_eps: float):
        super().__init__()
        half, quarter, sixteenth = width // 2, width // 4, width // 16
        self.branch1 = ConvBatchNormReLU(width, half, 1, spatial_dims, batch_norm_eps)
        self.branch2_reduce = ConvBatchNormReLU(width + half, sixteenth, 1, spatial_dims, batch_norm_eps)
        self.branch2 = ConvBatchNormReLU(sixteenth, quarter, 3, spatial_dims, batch_norm_eps)
        self.branch3_reduce = ConvBatchNormReLU(width + half + quarter, sixteenth, 1, spatial_dims, batch_norm_eps)
        self.branch3 = ConvBatchNormReLU(sixteenth, quarter, 5, spatial_dims, batch_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.branch1(x)
        out2 = self.branch2(self.branch2_reduce(torch.cat([x, out1], dim=1)))
        out3 = self.branch3(self.branch3_reduce(torch.cat([x, out1, out2], dim=1)))
        return torch.cat([out1, out2, out3], dim=1)


class WordCrossAttention(nn.Module):
    """Patch features attend to the word features (no padding mask: pads are attended, as in the official code)."""

    def __init__(self, width, text_dim, attention_dim, num_heads, dropout, config=None):
        super().__init__()
        self.image_proj = nn.Linear(width, attention_dim)
        self.text_proj = nn.Linear(text_dim, attention_dim)
        self.attn = PackedMultiheadAttention(config, attention_dim, num_heads, dropout)
        self.back_proj = nn.Linear(attention_dim, width)

    def forward(self, patches: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        query = self.image_proj(patches)
        key_value = self.text_proj(words)
        return self.back_proj(self.attn(query, key_value, key_value))


class DenseAligner(nn.Module):
    """The vision adapter. Input: the block's `norm2` output [B, P, D] (P = prefix tokens + grid²) and the word
    features [B, L, text_dim]; output [B, P, D], scaled and added to the block's MLP output (before LayerScale)."""

    def __init__(
        self,
        hidden_size: int,
        width: int,
        text_dim: int,
        grid_size: int,
        num_prefix_tokens: int,
        attention_dim: int = 128,
        num_heads: int = 8,
        dropout: float = 0.1,
        batch_norm_eps: float = 1e-3,
        config: DetrisConfig | None = None,
    ):
        super().__init__()
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.down_proj = nn.Linear(hidden_size, width)
        self.act = nn.ReLU()
        self.dense_moc = DenseMixtureOfConvolutions(width, 2, batch_norm_eps)
        self.cross_attention = WordCrossAttention(width, text_dim, attention_dim, num_heads, dropout, config)
        self.up_proj = nn.Linear(width, hidden_size)
        self.up_proj.detris_init_family = "dense_aligner.output"
        mark_init_family(self, "dense_aligner")

    @classmethod
    def from_settings(cls, settings, config: DetrisConfig) -> "DenseAligner":
        """A Dense Aligner with the widths of `settings` (a `DetrisConfig` or the PEFT `DetrisAdapterConfig`) for a
        base model of configuration `config`."""
        return cls(
            hidden_size=config.vision_config.hidden_size,
            width=settings.vision_adapter_dim,
            text_dim=config.text_config.hidden_size,
            grid_size=config.grid_size,
            num_prefix_tokens=config.num_prefix_tokens,
            attention_dim=settings.vision_adapter_attention_dim,
            num_heads=settings.vision_adapter_attention_heads,
            dropout=settings.vision_adapter_attention_dropout,
            batch_norm_eps=settings.adapter_batch_norm_eps,
            config=config,
        )

    def forward(self, hidden_states: torch.Tensor, word_features: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden_states.shape[1]
        expected = self.num_prefix_tokens + self.grid_size**2
        if num_tokens != expected:
            raise ValueError(
                f"the Dense Aligner expects {self.num_prefix_tokens} prefix tokens + a {self.grid_size}x{self.grid_size} "
                f"patch grid = {expected} tokens, got {num_tokens}; images must be the model's input size"
            )
        x0 = self.act(self.down_proj(hidden_states))
        patches = x0[:, self.num_prefix_tokens :]
        # channels-last view of the patch grid (no copy); the convolutions keep that layout
        grid = patches.unflatten(1, (self.grid_size, self.grid_size)).permute(0, 3, 1, 2)
        mixed = self.dense_moc(grid) + grid
        mixed = mixed.flatten(2).transpose(1, 2)
        attended = self.cross_attention(mixed, word_features)
        # x0 is added after the concatenation, so the prefix tokens come out as 2 * x0 (as in the official code).
        out = torch.cat([x0[:, : self.num_prefix_tokens], attended], dim=1) + x0
        return self.up_proj(out)


class TextAdapter(nn.Module):
    """The text adapter. Input: the post-attention residual stream [B, L, D] (not layer-normed); output [B, L, D],
    scaled and added beside the MLP residual. The convolutions run over every token but the first (SOT)."""

    def __init__(self, hidden_size: int, width: int, batch_norm_eps: float = 1e-3):
        super().__init__()
        self.down_proj = nn.Linear(hidden_size, width)
        self.act = nn.ReLU()
        self.dense_moc = DenseMixtureOfConvolutions(width, 1, batch_norm_eps)
        self.up_proj = nn.Linear(width, hidden_size)
        self.up_proj.detris_init_family = "text_adapter.output"
        mark_init_family(self, "text_adapter")

    @classmethod
    def from_settings(cls, settings, config: DetrisConfig) -> "TextAdapter":
        """A text adapter with the widths of `settings` for a base model of configuration `config`."""
        return cls(config.text_config.hidden_size, settings.text_adapter_dim, settings.adapter_batch_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x0 = self.act(self.down_proj(hidden_states))
        mixed = self.dense_moc(x0[:, 1:].transpose(1, 2)).transpose(1, 2)
        # The one residual: + x0 after concatenation (so SOT comes out as 2 * x0).
        out = torch.cat([x0[:, :1], mixed], dim=1) + x0
        return self.up_proj(out)


def add_scaled_adapter_output(result: torch.Tensor, adapter: nn.Module, scale: float, *inputs: torch.Tensor) -> torch.Tensor:
    """`result + scale * adapter(*inputs)`, the adapter run in its own dtype (PEFT may keep adapters in fp32 on a
    bf16 model) and its output cast back to `result`'s."""
    dtype = adapter.down_proj.weight.dtype
    return result + scale * adapter(*(t.to(dtype) for t in inputs)).to(result.dtype)


def mark_init_family(root: nn.Module, family: str) -> None:
    """Tag every submodule of `root` not tagged yet (inner parts are built, and tagged, first) with the DETRIS part it
    belongs to. transformers calls `_init_weights` on each module that holds tensors, without its context; the tag
    tells `_init_weights` which rule a plain `nn.Linear` or `nn.Conv2d` follows (backbone, adapter or head)."""
    for module in root.modules():
        if getattr(module, "detris_init_family", None) is None:
            module.detris_init_family = family


def init_adapter_module(module: nn.Module, family: str, init_mode: str) -> None:
    """The official initialisation of one module of a Dense Aligner (`family` "dense_aligner") or a text adapter
    ("text_adapter"); "<kind>.output" marks the output projection `up_proj` (the one home of the adapter init).
    Dense Aligner: linears N(0, 0.02) truncated, convs Kaiming-normal (fan_in, ReLU), attention in-projection
    Xavier-uniform, all biases 0. Text adapter: PyTorch's defaults (Kaiming-uniform a=sqrt(5), uniform biases).
    BatchNorm 1/0 with fresh statistics. `init_mode="zeros"` zeroes `up_proj`, so the adapter starts as a no-op.
    Tensors already loaded from a checkpoint are left alone."""
    kind, _, part = family.partition(".")
    if part == "output" and init_mode == "zeros":
        init.zeros_(module.weight)
        init.zeros_(module.bias)
    elif kind == "dense_aligner" and isinstance(module, nn.Linear):
        init.trunc_normal_(module.weight, std=0.02)
        init.zeros_(module.bias)
    elif kind == "dense_aligner" and isinstance(module, nn.Conv2d):
        init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        init.zeros_(module.bias)
    elif isinstance(module, (nn.Linear, nn.Conv1d)):
        init_pytorch_default(module)
    elif isinstance(module, PackedMultiheadAttention):
        init.xavier_uniform_(module.in_proj_weight)
        init.zeros_(module.in_proj_bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        init_batch_norm(module)


@torch.no_grad()
def init_adapter_weights(adapter: nn.Module, init_mode: str = "official") -> None:
    """Initialise a whole `DenseAligner` / `TextAdapter` (e.g. one the PEFT method adds) with `init_adapter_module`."""
    for module in adapter.modules():
        init_adapter_module(module, module.detris_init_family, init_mode)


def init_pytorch_default(module: nn.Module) -> None:
    """PyTorch's default init of a linear or convolution: Kaiming-uniform (a=sqrt(5)), bias U(+-1/sqrt(fan_in))."""
    init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    if module.bias is not None:
        fan_in = module.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        init.uniform_(module.bias, -bound, bound)


def init_batch_norm(module: nn.Module) -> None:
    init.ones_(module.weight)
    init.zeros_(module.bias)
    if module.running_mean is not None:
        init.zeros_(module.running_mean)
        init.ones_(module.running_var)
        init.zeros_(module.num_batches_tracked)


class CheckpointedCall:
    """Handed to a block that gradient checkpointing will run twice (forward, then recomputation in backward). The
    recomputation must not count the batch twice in the adapters' BatchNorm statistics: `keep_statistics_on_rerun`
    lets it update scratch copies instead, so a checkpointed step leaves exactly the state of a plain one."""

    def __init__(self):
        self.ran = False

    @contextlib.contextmanager
    def keep_statistics_on_rerun(self, block: nn.Module):
        if not self.ran:
            self.ran = True
            yield
            return
        names = ("running_mean", "running_var", "num_batches_tracked")
        norms = [m for m in block.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.training and m.track_running_stats]
        kept = [(norm, [getattr(norm, name) for name in names]) for norm in norms]
        for norm, tensors in kept:
            for name, tensor in zip(names, tensors):
                setattr(norm, name, tensor.clone())  # the recomputation updates (and autograd keeps) these copies
        try:
            yield
        finally:
            for norm, tensors in kept:
                for name, tensor in zip(names, tensors):
                    setattr(norm, name, tensor)


# ===== backbone blocks holding the adapters ===========================================================================
# The blocks are transformers' DINOv2 / CLIP blocks with one change each: the MLP gets the adapter's second input
# (the word features, or the block's post-attention residual stream) as an argument. Adapters built into the model sit
# in the MLP beside `fc1` / `fc2` (`...mlp.dense_aligner.*`, `...mlp.text_adapter.*`), so the frozen backbone keeps
# transformers' key names; the PEFT method wraps the same MLP (`...mlp.base_layer.*` + `...mlp.detris_*.<name>.*`).
class DetrisVisionMLP(Dinov2WithRegistersMLP):
    """DINOv2 MLP, plus a Dense Aligner when the block is adapted: mlp(x) + scale * DenseAligner(x, words)."""

    def __init__(self, config, dense_aligner: DenseAligner | None = None, adapter_scale: float = 0.0):
        super().__init__(config)
        self.dense_aligner = dense_aligner
        self.adapter_scale = adapter_scale

    @property
    def adapter(self) -> DenseAligner | None:
        return self.dense_aligner

    def forward(self, hidden_states: torch.Tensor, word_features: torch.Tensor | None = None) -> torch.Tensor:
        output = super().forward(hidden_states)
        if self.dense_aligner is None:
            return output
        return add_scaled_adapter_output(output, self.dense_aligner, self.adapter_scale, hidden_states, word_features)


class DetrisVisionLayer(Dinov2WithRegistersLayer):
    """A DINOv2 block whose MLP also receives the word features; returns (hidden_states, attention weights or None).
    The word features are a positional argument, so gradient checkpointing (reentrant or not) recomputes the block
    with them and backpropagates into the text side."""

    def __init__(self, config, dense_aligner: DenseAligner | None = None, adapter_scale: float = 0.0):
        super().__init__(config)
        if config.use_swiglu_ffn:
            raise ValueError("DETRIS adapts DINOv2 blocks with a plain MLP; vision_config.use_swiglu_ffn must be False")
        self.mlp = DetrisVisionMLP(config, dense_aligner, adapter_scale)

    def forward(self, hidden_states: torch.Tensor, word_features: torch.Tensor | None = None,
                checkpointed_call: CheckpointedCall | None = None, **kwargs):
        with checkpointed_call.keep_statistics_on_rerun(self) if checkpointed_call else contextlib.nullcontext():
            residual = hidden_states
            hidden_states, attn_weights = self.attention(self.norm1(hidden_states), **kwargs)
            hidden_states = self.drop_path(self.layer_scale1(hidden_states)) + residual
            residual = hidden_states
            hidden_states = self.mlp(self.norm2(hidden_states), word_features)
            hidden_states = self.drop_path(self.layer_scale2(hidden_states)) + residual
        return hidden_states, attn_weights


class DetrisTextMLP(CLIPMLP):
    """CLIP MLP, plus a text adapter when the layer is adapted: mlp(ln2(h)) + scale * TextAdapter(h)."""

    def __init__(self, config, text_adapter: TextAdapter | None = None, adapter_scale: float = 0.0):
        super().__init__(config)
        self.text_adapter = text_adapter
        self.adapter_scale = adapter_scale

    @property
    def adapter(self) -> TextAdapter | None:
        return self.text_adapter

    def forward(self, hidden_states: torch.Tensor, residual_stream: torch.Tensor | None = None) -> torch.Tensor:
        output = super().forward(hidden_states)
        if self.text_adapter is None:
            return output
        return add_scaled_adapter_output(output, self.text_adapter, self.adapter_scale, residual_stream)


class DetrisTextEncoderLayer(CLIPEncoderLayer):
    """A CLIP layer whose MLP also receives the post-attention residual stream (the text adapter's input); returns
    (hidden_states, attention weights or None)."""

    def __init__(self, config, text_adapter: TextAdapter | None = None, adapter_scale: float = 0.0):
        super().__init__(config)
        self.mlp = DetrisTextMLP(config, text_adapter, adapter_scale)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                checkpointed_call: CheckpointedCall | None = None, **kwargs):
        with checkpointed_call.keep_statistics_on_rerun(self) if checkpointed_call else contextlib.nullcontext():
            residual = hidden_states
            hidden_states, attn_weights = self.self_attn(self.layer_norm1(hidden_states), attention_mask=attention_mask, **kwargs)
            hidden_states = residual + hidden_states
            hidden_states = hidden_states + self.mlp(self.layer_norm2(hidden_states), hidden_states)
        return hidden_states, attn_weights


def run_layers(layers: nn.ModuleList, hidden_states: torch.Tensor, second_input, output_attentions: bool,
               differentiable_states: bool = False):
    """Run the blocks of an encoder, each called as `layer(hidden_states, second_input)` (the word features for the
    vision blocks, the causal mask for the text layers). Returns (last output, every hidden state from the embeddings
    on, the attention weights of every block or an empty tuple).

    The embeddings of a frozen backbone do not require a gradient, so with grad enabled their output is made to (a
    cheap leaf) when the blocks are checkpointed (reentrant checkpointing backpropagates through a block only if one
    of its tensor inputs requires a gradient: the adapters then get theirs with or without
    `enable_input_require_grads()`), and when `differentiable_states` asks for returned hidden states and attention
    weights that gradients can be taken against (saliency, `retain_grad`)."""
    checkpointed = any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in layers)
    if (checkpointed or differentiable_states) and torch.is_grad_enabled() and not hidden_states.requires_grad:
        hidden_states = hidden_states.requires_grad_()
    all_hidden_states, attentions = [hidden_states], []
    for layer in layers:
        call = CheckpointedCall() if checkpointed else None
        hidden_states, attn_weights = layer(hidden_states, second_input, checkpointed_call=call)
        all_hidden_states.append(hidden_states)
        if output_attentions:
            attentions.append(attn_weights)
    return hidden_states, tuple(all_hidden_states), tuple(attentions)


class DetrisVisionEncoder(nn.Module):
    def __init__(self, config: DetrisConfig):
        super().__init__()
        adapted = set(config.vision_adapter_layers) if config.adapters_in_model else set()
        self.layer = nn.ModuleList(
            DetrisVisionLayer(config.vision_config, DenseAligner.from_settings(config, config) if i in adapted else None,
                              config.adapter_scale)
            for i in range(config.vision_config.num_hidden_layers)
        )


class DetrisVisionTransformer(nn.Module):
    """DINOv2-with-registers (key layout of transformers' `Dinov2WithRegistersModel`) with Dense Aligners."""

    def __init__(self, config: DetrisConfig):
        super().__init__()
        self.config = config.vision_config
        self.embeddings = DetrisVisionEmbeddings(config.vision_config)
        self.encoder = DetrisVisionEncoder(config)
        self.layernorm = nn.LayerNorm(config.vision_config.hidden_size, eps=config.vision_config.layer_norm_eps)
        mark_init_family(self, "vision")

    def forward(self, pixel_values, word_features, output_attentions: bool = False, differentiable_states: bool = False):
        """Returns (final-norm output [B, P, D], all hidden states (embeddings + each block, P tokens), attention
        weights per block or an empty tuple)."""
        hidden_states = self.embeddings(pixel_values)
        hidden_states, all_hidden_states, attentions = run_layers(
            self.encoder.layer, hidden_states, word_features, output_attentions, differentiable_states
        )
        return self.layernorm(hidden_states), all_hidden_states, attentions


class DetrisTextEncoder(nn.Module):
    def __init__(self, config: DetrisConfig):
        super().__init__()
        adapted = set(config.text_adapter_layers) if config.adapters_in_model else set()
        self.layers = nn.ModuleList(
            DetrisTextEncoderLayer(config.text_config, TextAdapter.from_settings(config, config) if i in adapted else None,
                                   config.adapter_scale)
            for i in range(config.text_config.num_hidden_layers)
        )


class DetrisTextTransformer(nn.Module):
    """CLIP text transformer (key layout of transformers' `CLIPTextModel`) with text adapters."""

    def __init__(self, config: DetrisConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config.text_config)
        self.encoder = DetrisTextEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.text_config.hidden_size, eps=config.text_config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, output_attentions: bool = False, differentiable_states: bool = False):
        """Returns (final-norm word features [B, L, D_t], all hidden states, attention weights per layer or ())."""
        hidden_states = self.embeddings(input_ids=input_ids)
        length = input_ids.shape[1]
        future = torch.ones(length, length, dtype=torch.bool, device=hidden_states.device).triu(1)
        causal_mask = torch.zeros(length, length, dtype=hidden_states.dtype, device=hidden_states.device)
        causal_mask = causal_mask.masked_fill(future, torch.finfo(hidden_states.dtype).min)[None, None]
        hidden_states, all_hidden_states, attentions = run_layers(
            self.encoder.layers, hidden_states, causal_mask, output_attentions, differentiable_states
        )
        return self.final_layer_norm(hidden_states), all_hidden_states, attentions


class DetrisTextModel(nn.Module):
    """The CLIP text tower with its projection (key layout of transformers' `CLIPTextModelWithProjection`)."""

    def __init__(self, config: DetrisConfig):
        super().__init__()
        self.config = config.text_config
        self.text_model = DetrisTextTransformer(config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.text_config.projection_dim, bias=False)
        mark_init_family(self, "text")


# ===== head: neck, decoder, projector =================================================================================
# Shapes for DETRIS-B at 448 px (G = 32 patches per side, C = `fusion_hidden_size` = 512): neck taps 3 x [B, D, G, G] +
# sentence [B, 512] -> [B, C, G, G]; decoder + words [B, L, 512] -> [B, C, G, G]; projector + sentence -> [B, 1, 4G, 4G].
class ConvBatchNormReLU2d(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU; children `0`/`1`/`2` as in the official checkpoints."""

    def __init__(self, in_channels, out_channels, kernel_size, batch_norm_eps):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels, eps=batch_norm_eps),
            nn.ReLU(),
        )


class CoordConv(nn.Module):
    """Appends x and y coordinate channels (linspace(-1, 1), x first) before a conv block."""

    def __init__(self, in_channels, out_channels, kernel_size, batch_norm_eps):
        super().__init__()
        self.conv = ConvBatchNormReLU2d(in_channels + 2, out_channels, kernel_size, batch_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        ys = torch.linspace(-1, 1, height, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, width, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([grid_x, grid_y]).expand(batch, -1, -1, -1)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # keep the map channels-last (as the vision taps come) so the concatenation and the conv stay in it
            coords = coords.contiguous(memory_format=torch.channels_last)
        return self.conv(torch.cat([x, coords], dim=1))


class TextGate(nn.Module):
    """Multiplies a feature map by an attention readout of the sentence feature.

    The official module is `nn.MultiheadAttention(query=pixels, key=value=sentence)` followed by `pixels * output`.
    With a single key the softmax is exactly 1 for every query, so the output is `out_proj(W_v s + b_v)` for every
    pixel: that is what is computed here (no q/k work). The packed `in_proj` layout is kept so official weights load
    unchanged; its q and k thirds have no effect (and get zero gradient).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        value_weight = self.in_proj_weight[2 * self.hidden_size :]
        value_bias = self.in_proj_bias[2 * self.hidden_size :]
        gate = self.out_proj(F.linear(sentence, value_weight, value_bias))
        return features * gate[:, :, None, None]


class DetrisNeck(nn.Module):
    """Text-gated fusion of three vision taps: 3 x [B, D, G, G] + sentence [B, P] -> [B, C, G, G]."""

    def __init__(self, config):
        super().__init__()
        vision_dim = config.vision_config.hidden_size
        hidden = config.fusion_hidden_size
        eps = config.head_batch_norm_eps
        self.txt_proj = nn.Linear(config.text_config.projection_dim, hidden)
        self.f3_proj = ConvBatchNormReLU2d(vision_dim, hidden, 1, eps)
        self.f4_proj = ConvBatchNormReLU2d(vision_dim, hidden, 1, eps)
        # Official: a 1x1 stride-1 ConvTranspose2d, i.e. this conv with the weight's first two dims swapped.
        self.f5_proj = ConvBatchNormReLU2d(vision_dim, hidden, 1, eps)
        self.fusion3 = TextGate(hidden)
        self.fusion4 = TextGate(hidden)
        self.fusion5 = TextGate(hidden)
        self.aggr = ConvBatchNormReLU2d(3 * hidden, hidden, 1, eps)
        self.coordconv = nn.Sequential(CoordConv(hidden, hidden, 3, eps), ConvBatchNormReLU2d(hidden, hidden, 3, eps))

    def forward(self, vision_features, sentence: torch.Tensor) -> torch.Tensor:
        v3, v4, v5 = vision_features
        text = self.txt_proj(sentence)
        f3 = self.fusion3(self.f3_proj(v3), text)
        f4 = self.fusion4(self.f4_proj(v4), text)
        f5 = self.fusion5(self.f5_proj(v5), text)
        fused = self.aggr(torch.cat([f3, f4, f5], dim=1))
        return fused + self.coordconv(fused)


def sine_positions_1d(dim: int, length: int, device=None, dtype=None) -> torch.Tensor:
    """[length, dim] sinusoid: even channels sin, odd channels cos, frequencies 10000^(-k/dim)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table.to(dtype) if dtype is not None else table


def sine_positions_2d(dim: int, height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """[height * width, dim] (row-major): the first dim/2 channels encode x, the rest y (sin/cos interleaved)."""
    half = dim // 2
    x_codes = sine_positions_1d(half, width, device)  # [W, half]
    y_codes = sine_positions_1d(half, height, device)  # [H, half]
    table = torch.cat(
        [x_codes[None, :, :].expand(height, -1, -1), y_codes[:, None, :].expand(-1, width, -1)], dim=-1
    ).reshape(height * width, dim)
    return table.to(dtype) if dtype is not None else table


class DetrisDecoderLayer(nn.Module):
    """Pre-norm layer: self-attention over pixels, cross-attention to the words (pads masked), feed-forward.
    Each attention output is LayerNormed before its residual add, as in the official (CRIS) decoder."""

    def __init__(self, config):
        super().__init__()
        hidden = config.fusion_hidden_size
        heads = config.decoder_num_attention_heads
        dropout = config.decoder_dropout
        eps = config.head_layer_norm_eps
        self.self_attn = PackedMultiheadAttention(config, hidden, heads, dropout)
        self.multihead_attn = PackedMultiheadAttention(config, hidden, heads, dropout)
        self.self_attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.cross_attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.norm3 = nn.LayerNorm(hidden, eps=eps)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, config.decoder_ffn_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.LayerNorm(config.decoder_ffn_dim, eps=eps),
            nn.Linear(config.decoder_ffn_dim, hidden),
        )
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, pixels, words, pixel_pos, word_pos, word_padding_mask):
        normed = self.norm1(pixels)
        query = normed + pixel_pos
        attended = self.self_attn(query, query, normed)
        pixels = pixels + self.dropout1(self.self_attn_norm(attended))

        query = self.norm2(pixels) + pixel_pos
        attended = self.multihead_attn(query, words + word_pos, words, key_padding_mask=word_padding_mask)
        pixels = pixels + self.dropout2(self.cross_attn_norm(attended))

        return pixels + self.dropout3(self.ffn(self.norm3(pixels)))


class DetrisDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([DetrisDecoderLayer(config) for _ in range(config.decoder_num_layers)])
        self.norm = nn.LayerNorm(config.fusion_hidden_size, eps=config.head_layer_norm_eps)

    def forward(self, feature_map, words, word_padding_mask):
        """`feature_map` [B, C, H, W], `words` [B, L, C], `word_padding_mask` [B, L] (True = pad) -> [B, C, H, W]."""
        batch, channels, height, width = feature_map.shape
        pixel_pos = sine_positions_2d(channels, height, width, feature_map.device, feature_map.dtype)[None]
        word_pos = sine_positions_1d(channels, words.shape[1], words.device, words.dtype)[None]
        pixels = feature_map.flatten(2).transpose(1, 2)
        for layer in self.layers:
            pixels = layer(pixels, words, pixel_pos, word_pos, word_padding_mask)
        return self.norm(pixels).transpose(1, 2).reshape(batch, channels, height, width)


class DetrisProjector(nn.Module):
    """Upsamples the decoded map 4x and convolves it with a per-sample 3x3 kernel (+ bias) predicted from the
    sentence feature, giving one logit map per sample."""

    def __init__(self, config):
        super().__init__()
        hidden = config.fusion_hidden_size
        width = config.projector_hidden_size
        eps = config.head_batch_norm_eps
        self.kernel_size = config.projector_kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            ConvBatchNormReLU2d(hidden, hidden, 3, eps),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            ConvBatchNormReLU2d(hidden, width, 3, eps),
            nn.Conv2d(width, width, 1),
        )
        self.txt = nn.Linear(config.text_config.projection_dim, width * self.kernel_size**2 + 1)

    def forward(self, feature_map: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        pixels = self.vis(feature_map)
        batch, channels, _, _ = pixels.shape
        params = self.txt(sentence)
        kernels = params[:, :-1].reshape(batch, channels, self.kernel_size, self.kernel_size)
        return per_sample_conv2d(pixels, kernels, params[:, -1])


def per_sample_conv2d(pixels: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`out[b] = conv2d(pixels[b], kernels[b], bias[b], padding=k // 2)`: one output channel per sample, each sample
    with its own k x k kernel. Computed as one batched matmul over the channels (a map per kernel tap, [B, k*k, H, W])
    and the sum of the k*k shifted maps, instead of a grouped convolution with one output channel per group, which
    CPU convolution kernels run at a fraction of their speed. Same arithmetic; works for any memory format."""
    batch, channels, height, width = pixels.shape
    size = kernels.shape[-1]
    pad = size // 2
    taps = torch.bmm(kernels.reshape(batch, channels, size * size).transpose(1, 2), pixels.reshape(batch, channels, height * width))
    taps = F.pad(taps.reshape(batch, size * size, height, width), (pad, pad, pad, pad))
    out = bias[:, None, None]
    for row in range(size):
        for col in range(size):
            out = out + taps[:, row * size + col, row : row + height, col : col + width]
    return out[:, None]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over samples of 1 - (2 |p t| + s) / (|p| + |t| + s), with p = sigmoid(logits)."""
    probs = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    overlap = (probs * target).sum(1)
    return (1 - (2 * overlap + smooth) / (probs.sum(1) + target.sum(1) + smooth)).mean()


# ===== bf16 / fp16 on CPUs without native low-precision arithmetic ====================================================
# PyTorch runs bf16 / fp16 matmuls and convolutions on the CPU through oneDNN only when the CPU supports them
# (AVX512-BF16 / AMX, or at least AVX-512). Elsewhere (e.g. AVX2-only CPUs) they fall back to scalar reference kernels
# 50-500x slower than fp32. `low_precision_emulation` runs those ops the way native hardware does: low-precision
# inputs and weights, fp32 accumulation, output rounded to the low-precision dtype. Tensors between ops stay in the
# model's dtype. Nothing changes for fp32, on accelerators, or on CPUs with native support.
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)
WIDENED_OPS = frozenset(
    {
        F.linear, F.conv1d, F.conv2d, F.scaled_dot_product_attention, torch.matmul, torch.mm, torch.bmm, torch.addmm,
        torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm,
    }
)


@functools.lru_cache(maxsize=None)
def native_low_precision_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU runs `dtype` matmuls / convolutions through oneDNN (fast) rather than reference kernels."""
    if dtype not in LOW_PRECISION_DTYPES:
        return True
    name = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):
        return False


class WidenLowPrecisionOps(TorchFunctionMode):
    """Runs the ops of `WIDENED_OPS` in fp32 on low-precision CPU tensors and rounds their output back."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in WIDENED_OPS:
            return func(*args, **kwargs)
        autocast_dtype = None
        if torch.is_autocast_enabled("cpu"):
            autocast_dtype = torch.get_autocast_dtype("cpu")
            if autocast_dtype not in LOW_PRECISION_DTYPES or native_low_precision_cpu(autocast_dtype):
                autocast_dtype = None
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if autocast_dtype is not None:
            target = autocast_dtype
        else:
            dtypes = {t.dtype for t in tensors}
            if len(dtypes) != 1 or not all(t.device.type == "cpu" for t in tensors):
                return func(*args, **kwargs)
            target = dtypes.pop()
            if target not in LOW_PRECISION_DTYPES or native_low_precision_cpu(target):
                return func(*args, **kwargs)

        def widen(value):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.to(target).float()  # rounded to the low precision first, as autocast / storage would
            return value

        with torch.autocast("cpu", enabled=False):
            out = func(*(widen(a) for a in args), **{k: widen(v) for k, v in kwargs.items()})
        return out.to(target)


def needs_low_precision_emulation(device: torch.device, dtype: torch.dtype) -> bool:
    """True on a CPU without native support when the parameters (`dtype`) or an active CPU autocast are bf16 / fp16."""
    if torch.device(device).type != "cpu":
        return False
    if dtype in LOW_PRECISION_DTYPES and not native_low_precision_cpu(dtype):
        return True
    if torch.is_autocast_enabled("cpu"):
        autocast_dtype = torch.get_autocast_dtype("cpu")
        return autocast_dtype in LOW_PRECISION_DTYPES and not native_low_precision_cpu(autocast_dtype)
    return False


def low_precision_emulation(device: torch.device, dtype: torch.dtype):
    """Context for a forward pass with parameters of `dtype` on `device`: widens the slow low-precision CPU ops when
    needed, else does nothing."""
    if needs_low_precision_emulation(device, dtype):
        return WidenLowPrecisionOps()
    return contextlib.nullcontext()


# ===== pretrained model: every weight initialisation ==================================================================
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
    _no_split_modules = ["DetrisVisionEmbeddings", "DetrisVisionLayer", "DetrisTextEncoderLayer", "DetrisDecoderLayer"]

    @property
    def is_gradient_checkpointing(self) -> bool:
        """`is_activation_checkpointing` under its former name. peft (<= 0.21) reads this name on every `PeftModel`
        it builds (`get_peft_model`, `PeftModel.from_pretrained`); transformers' own alias would print a
        FutureWarning each time."""
        return self.is_activation_checkpointing

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """Every initialisation of the model, by the part a module belongs to (`detris_init_family`). Adapters: the
        official init (`init_adapter_module`, with `config.adapter_init`). Head: PyTorch's defaults, which the official
        code trains from. Backbones: as transformers initialises DINOv2 / CLIP text (they are normally loaded from
        pretrained weights)."""
        config = self.config
        family = getattr(module, "detris_init_family", None)
        if isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            init_batch_norm(module)
        elif family is not None and family.startswith(("dense_aligner", "text_adapter")):
            init_adapter_module(module, family, config.adapter_init)
        elif family == "head":
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                init_pytorch_default(module)
            elif isinstance(module, (PackedMultiheadAttention, TextGate)):
                init.xavier_uniform_(module.in_proj_weight)
                init.zeros_(module.in_proj_bias)
                init.zeros_(module.out_proj.bias)
        elif family == "vision":
            std = config.vision_config.initializer_range
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                init.trunc_normal_(module.weight, std=std)
                init.zeros_(module.bias)
            elif isinstance(module, DetrisVisionEmbeddings):
                init.trunc_normal_(module.position_embeddings, std=std)
                init.trunc_normal_(module.cls_token, std=std)
                init.zeros_(module.mask_token)
                init.zeros_(module.register_tokens)
            elif isinstance(module, Dinov2WithRegistersLayerScale):
                init.constant_(module.lambda1, config.vision_config.layerscale_value)
        elif family == "text":
            std = 0.02 * config.text_config.initializer_factor
            if isinstance(module, (nn.Linear, nn.Embedding)):
                init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, CLIPTextEmbeddings):
                init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
        elif isinstance(module, DetrisForReferringSegmentation):
            init.constant_(module.logit_scale, CLIP_LOGIT_SCALE_INIT)


# ===== the task model =================================================================================================
def _adapter_config_base(folder) -> str | None:
    path = os.path.join(str(folder), "adapter_config.json")
    if not os.path.isdir(str(folder)) or not os.path.isfile(path) or os.path.isfile(os.path.join(str(folder), "config.json")):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file).get("base_model_name_or_path")


def adapter_base_model_path(folder) -> str | None:
    """The base model of a local PEFT adapter folder (one without its own `config.json`): its
    `base_model_name_or_path`, a relative path (`../base`) resolved against the adapter folder so that a moved or
    copied release still finds its base; a Hub id or absolute path as written. None when `folder` is no local adapter
    folder or names no base. Raises `OSError` for a relative base missing beside the adapter."""
    base = _adapter_config_base(folder)
    relative = bool(base) and not os.path.isabs(base) and (
        base.startswith(".") or os.path.isdir(os.path.join(str(folder), base)))
    if not relative:
        return base or None
    resolved = os.path.normpath(os.path.join(os.path.abspath(str(folder)), base))
    if not os.path.isfile(os.path.join(resolved, "config.json")):
        raise OSError(
            f"the adapter folder {str(folder)!r} names its base model {base!r} relative to itself, but {resolved!r} "
            "holds no config.json; expected the base folder there (keep a release's base/ beside its adapters)"
        )
    return resolved


class DetrisForReferringSegmentation(DetrisPreTrainedModel):
    """DETRIS: frozen DINOv2-reg4 + CLIP text encoders with Dense Aligners / text adapters and a neck-decoder-projector
    head. Only the adapters and the head are trainable."""

    def __init__(self, config: DetrisConfig):
        super().__init__(config)
        # the setter hands the resolved implementation down to the vision / text sub-configs the blocks read
        config._attn_implementation = config._attn_implementation
        if config.text_config.hidden_size != config.fusion_hidden_size:
            raise ValueError(
                f"the decoder attends to the word features, so text_config.hidden_size "
                f"({config.text_config.hidden_size}) must equal fusion_hidden_size ({config.fusion_hidden_size})"
            )
        self.vision_model = DetrisVisionTransformer(config)
        self.text_model = DetrisTextModel(config)
        self.neck = DetrisNeck(config)
        self.decoder = DetrisDecoder(config)
        self.projector = DetrisProjector(config)
        for head in (self.neck, self.decoder, self.projector):
            mark_init_family(head, "head")
        # CLIP's contrastive temperature: unused by DETRIS, kept (frozen) so a converted official checkpoint keeps
        # every one of its tensors and the parameter counts match the official ones.
        self.logit_scale = nn.Parameter(torch.tensor(CLIP_LOGIT_SCALE_INIT), requires_grad=False)
        self.post_init()
        self.freeze_backbones()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`; a local PEFT adapter folder whose `base_model_name_or_path` is relative
        (`../base`, as `detris convert --split-adapters` writes it) is loaded over that base resolved against the
        adapter folder, not the current directory (`adapter_base_model_path`)."""
        written, base = _adapter_config_base(pretrained_model_name_or_path), adapter_base_model_path(pretrained_model_name_or_path)
        if base != written:
            adapter_kwargs = dict(kwargs.pop("adapter_kwargs", None) or {})
            adapter_kwargs["_adapter_model_path"] = str(pretrained_model_name_or_path)
            pretrained_model_name_or_path, kwargs["adapter_kwargs"] = base, adapter_kwargs
        # Loading replaces the parameters (and their requires_grad flags): re-apply the freezing rule.
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
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
        adapter_keys = set(model.adapter_state_dict())
        for target, source, origin in ((model.vision_model, vision, vision_model_name_or_path),
                                       (model.text_model, text, text_model_name_or_path)):
            prefix = "vision_model." if target is model.vision_model else "text_model."
            missing, unexpected = target.load_state_dict(source.state_dict(), strict=False)
            missing = [k for k in missing if prefix + k not in adapter_keys]
            if missing or unexpected:
                raise ValueError(f"{origin} does not fit the DETRIS backbone: missing {missing[:10]}, unexpected {unexpected[:10]}")
        return model

    # ----- adapters, freezing, train mode ----------------------------------------------------------------------
    def adapter_modules(self) -> dict[str, nn.Module]:
        """Every `DenseAligner` / `TextAdapter` of the model by module name (built-in or held by PEFT layers)."""
        return {name: module for name, module in self.named_modules() if isinstance(module, (DenseAligner, TextAdapter))}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters' tensors (parameters and BatchNorm statistics) under their full key names."""
        return {f"{name}.{key}": value for name, module in self.adapter_modules().items() for key, value in module.state_dict().items()}

    def freeze_backbones(self):
        """Freeze every backbone parameter that is not part of a built-in adapter (the official rule; adapters loaded
        through PEFT get their trainability from PEFT); re-apply the train mode rule of `train`."""
        for backbone in (self.vision_model, self.text_model):
            backbone.requires_grad_(False)
        for module in self.modules():
            if isinstance(module, (DetrisVisionMLP, DetrisTextMLP)) and module.adapter is not None:
                module.adapter.requires_grad_(True)
        self.logit_scale.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        """Like `nn.Module.train`, except that a BatchNorm whose parameters are all frozen stays in eval mode: its
        running statistics are part of a frozen module (e.g. the head of an adapters-only PEFT run, or the base copy
        of a head trained as `modules_to_save`) and must not drift while other parts train."""
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    params = list(module.parameters())
                    if params and not any(p.requires_grad for p in params):
                        module.eval()
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.text_model.embeddings.token_embedding = value

    # ----- forward ---------------------------------------------------------------------------------------------
    def expected_word_len(self) -> int:
        """The text length inputs must have: the `word_len` recorded by the active PEFT adapter when it has one (one
        base model can serve the adapters of several datasets, e.g. G-Ref umd's with 22 tokens beside RefCOCO's with
        17), else `config.word_len`."""
        configs = self.__dict__.get("peft_config")
        if configs:
            for module in self.modules():
                # a PEFT tuner layer (peft's BaseTunerLayer API: `active_adapters`, `disable_adapters`)
                if hasattr(module, "active_adapters") and hasattr(module, "disable_adapters") and module is not self:
                    if module.disable_adapters:
                        break
                    lengths = {getattr(configs.get(name), "word_len", None) for name in module.active_adapters} - {None}
                    if len(lengths) == 1:
                        return lengths.pop()
                    break
        return self.config.word_len

    def check_inputs(self, pixel_values, input_ids, labels):
        """Raise a `ValueError` naming the value and what is expected for inputs the model cannot run on."""
        size = self.config.input_size
        if pixel_values is None or input_ids is None:
            raise ValueError("DETRIS needs both `pixel_values` and `input_ids` (see DetrisProcessor)")
        if not torch.is_floating_point(pixel_values):
            raise ValueError(
                f"pixel_values must be a float tensor of normalised images, got {pixel_values.dtype}; use the processor "
                "(DetrisProcessor / DetrisImageProcessor) to turn raw images into pixel_values"
            )
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must have shape [batch, 3, {size}, {size}] (letterboxed by DetrisProcessor), "
                f"got {list(pixel_values.shape)}"
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("the batch is empty (batch size 0); expected at least one image and sentence")
        word_len = self.expected_word_len()
        if input_ids.ndim != 2 or input_ids.shape[1] != word_len:
            raise ValueError(
                f"input_ids must have shape [batch, word_len={word_len}] (the model's fixed text length), "
                f"got {list(input_ids.shape)}"
            )
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values and input_ids must have the same batch size, got {pixel_values.shape[0]} and {input_ids.shape[0]}"
            )
        has_values = input_ids.device.type != "meta"  # shapes only on the meta device (FLOP counting, tracing)
        vocab_size = self.get_input_embeddings().num_embeddings
        low, high = (int(input_ids.min()), int(input_ids.max())) if has_values else (0, 0)
        if low < 0 or high >= vocab_size:
            raise ValueError(f"input_ids must be in [0, {vocab_size - 1}] (the text vocabulary), got values in [{low}, {high}]")
        if labels is not None:
            if labels.shape[0] != pixel_values.shape[0]:
                raise ValueError(f"labels must have batch size {pixel_values.shape[0]}, got shape {list(labels.shape)}")
            if has_values and labels.numel() and not (float(labels.min()) >= 0.0 and float(labels.max()) <= 1.0):
                raise ValueError(
                    f"labels must be masks with values in [0, 1], got values in [{float(labels.min())}, {float(labels.max())}]"
                )

    def encode_text(self, input_ids: torch.Tensor, output_attentions: bool = False, differentiable_states: bool = False):
        """Word features [B, L, D_t] (after the final norm, no padding mask), sentence features [B, P] (the EOT
        token, found as the argmax of the ids as in the original code, times the projection), the text hidden states
        and attention weights."""
        words, hidden_states, attentions = self.text_model.text_model(input_ids, output_attentions, differentiable_states)
        eot = input_ids.argmax(dim=-1)
        pooled = words[torch.arange(words.shape[0], device=words.device), eot]
        return words, self.text_model.text_projection(pooled), hidden_states, attentions

    def encode_image(self, pixel_values, word_features, output_attentions: bool = False, differentiable_states: bool = False):
        """The three neck inputs 3 x [B, D, G, G] (two tap blocks' raw outputs and the final-norm output, patch
        tokens), the vision hidden states and attention weights."""
        last_hidden_state, hidden_states, attentions = self.vision_model(
            pixel_values, word_features, output_attentions, differentiable_states
        )
        prefix = self.config.num_prefix_tokens
        grid = self.config.grid_size
        taps = [hidden_states[i + 1] for i in self.config.neck_tap_layers] + [last_hidden_state]
        # [B, G*G, D] tokens viewed as [B, D, G, G] channels-last maps (no copy); the head's convolutions keep that layout
        features = tuple(tap[:, prefix:].unflatten(1, (grid, grid)).permute(0, 3, 1, 2) for tap in taps)
        return features, hidden_states, attentions

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DetrisSegmentationOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, input_size, input_size)`):
            Letterboxed, CLIP-normalised images (see `DetrisProcessor`). bf16 / fp16 images are cast to the model's
            dtype; integer images are refused (use the processor).
        input_ids (`torch.LongTensor` of shape `(batch_size, word_len)`):
            CLIP BPE ids, SOT ... EOT, padded with 0 to exactly `config.word_len`. Pads are not masked in the text
            encoder or the adapters (as in the official model); the decoder masks them (`input_ids == 0`).
        labels (`torch.FloatTensor` of shape `(batch_size, input_size, input_size)` or with a channel dim of 1):
            Target masks in [0, 1] at the input size; they are resized (nearest) to the logits' size for the BCE.
        output_attentions (`bool`, *optional*, defaults to `config.output_attentions`):
            Return the attention weights of both encoders: `attentions` (vision, per block
            `(batch_size, num_heads, prefix + G * G, prefix + G * G)`) and `text_attentions` (per layer
            `(batch_size, num_heads, word_len, word_len)`). Weights are computed only by the eager implementation.
        output_hidden_states (`bool` or `list[int]`, *optional*, defaults to `config.output_hidden_states`):
            Return the hidden states of both encoders: `hidden_states` (vision: embeddings + each block,
            `(batch_size, prefix + G * G, vision_hidden_size)`) and `text_hidden_states` (text: embeddings + each
            layer, `(batch_size, word_len, text_hidden_size)`). A list of indices (e.g. `[0, 2, -1]`) returns only those
            entries of each; the neck gets its taps either way.
        return_dict (`bool`, *optional*, defaults to `config.return_dict`):
            Return a [`DetrisSegmentationOutput`] instead of a plain tuple (its non-`None` fields, in order).
        """
        unknown = set(kwargs) - PROCESSOR_METADATA_KEYS
        if unknown:
            raise TypeError(f"forward() got unexpected arguments {sorted(unknown)}")
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        return_dict = return_dict if return_dict is not None else config.return_dict
        if output_attentions and config._attn_implementation != "eager":
            logger.warning_once(
                f"output_attentions=True: the {config._attn_implementation!r} attention does not compute attention "
                "weights, the returned entries are None; load the model with attn_implementation='eager' for them"
            )
        self.check_inputs(pixel_values, input_ids, labels)
        pixel_values = pixel_values.to(self.dtype)

        # bf16 / fp16 on a CPU without native support: fp32 accumulation inside matmuls and convolutions (no-op otherwise)
        with low_precision_emulation(pixel_values.device, self.dtype):
            # returned states are part of the graph, so gradients can be taken against them
            differentiable = bool(output_attentions) or output_hidden_states not in (None, False)
            word_features, text_embeds, text_hidden_states, text_attentions = self.encode_text(
                input_ids, output_attentions, differentiable
            )
            vision_features, hidden_states, attentions = self.encode_image(
                pixel_values, word_features, output_attentions, differentiable
            )
            neck_output = self.neck(vision_features, text_embeds)
            decoder_output = self.decoder(neck_output, word_features, word_padding_mask=input_ids == 0)
            logits = self.projector(decoder_output, text_embeds)

        loss = self.loss_function(logits, labels) if labels is not None else None
        output = DetrisSegmentationOutput(
            loss=loss,
            logits=logits,
            text_embeds=text_embeds,
            word_features=word_features,
            vision_features=vision_features,
            neck_output=neck_output,
            decoder_output=decoder_output,
            hidden_states=select_hidden_states(hidden_states, output_hidden_states),
            attentions=attentions if output_attentions else None,
            text_hidden_states=select_hidden_states(text_hidden_states, output_hidden_states),
            text_attentions=text_attentions if output_attentions else None,
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


def select_hidden_states(hidden_states: tuple, selection) -> tuple | None:
    """`hidden_states` for `output_hidden_states=True`, None for False / None, only the listed entries for a list of
    indices (negative ones count from the end; out-of-range ones select nothing, as in transformers)."""
    if selection is None or selection is False:
        return None
    if selection is True:
        return hidden_states
    indices = [selection] if isinstance(selection, int) else list(selection)
    count = len(hidden_states)
    return tuple(hidden_states[i] for i in indices if -count <= i < count)


__all__ = [
    "DetrisForReferringSegmentation",
    "adapter_base_model_path",
    "DetrisPreTrainedModel",
    "DetrisSegmentationOutput",
    "DenseAligner",
    "TextAdapter",
]
