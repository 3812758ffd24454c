"""The trainable DETRIS head: neck (text-gated fusion of three vision taps), transformer decoder, projector.

Shapes for DETRIS-B at 448 px (G = 32 patches per side, C = `fusion_hidden_size` = 512):
neck taps 3 x [B, D, G, G] + sentence [B, 512] -> [B, C, G, G]; decoder + words [B, L, 512] -> [B, C, G, G];
projector + sentence -> logits [B, 1, 4G, 4G]. See ARCHITECTURE.md §1.7-1.9.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PackedMultiheadAttention


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
        self.coordconv = nn.Sequential(
            CoordConv(hidden, hidden, 3, eps),
            ConvBatchNormReLU2d(hidden, hidden, 3, eps),
        )

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
        attn_impl = _head_attn_implementation(config)
        self.self_attn = PackedMultiheadAttention(hidden, heads, dropout, attn_impl)
        self.multihead_attn = PackedMultiheadAttention(hidden, heads, dropout, attn_impl)
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
        batch, channels, height, width = pixels.shape
        params = self.txt(sentence)
        kernels = params[:, :-1].reshape(batch, channels, self.kernel_size, self.kernel_size)
        bias = params[:, -1]
        # Sample b's map is convolved with sample b's kernel only.
        return per_sample_conv2d(pixels, kernels, bias)


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


def _head_attn_implementation(config) -> str:
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    return "eager" if implementation == "eager" else "sdpa"
