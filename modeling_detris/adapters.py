"""The two DETRIS adapters as plain modules: the Dense Aligner (vision) and the text adapter.

Both squeeze the token features to a bottleneck of width `a`, run a densely connected mixture of convolutions over
the tokens (1x1 / 3x3 / 5x5 kernels, each stage seeing the input and all earlier stages: "D-MoC"), and expand back.
The Dense Aligner works on the 2-D patch grid and then attends to the text's word features; the text adapter works
along the token axis. See ARCHITECTURE.md §1.3-1.5 for the exact arithmetic reproduced here.
"""

import math

import torch
from torch import nn
from transformers import initialization as init

from .attention import PackedMultiheadAttention


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
    (resp. 5x5) kernel. The concatenated a channels are added to the input (its own residual).
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

    def __init__(self, width, text_dim, attention_dim, num_heads, dropout, attn_implementation="sdpa"):
        super().__init__()
        self.image_proj = nn.Linear(width, attention_dim)
        self.text_proj = nn.Linear(text_dim, attention_dim)
        self.attn = PackedMultiheadAttention(attention_dim, num_heads, dropout, attn_implementation)
        self.back_proj = nn.Linear(attention_dim, width)

    def forward(self, patches: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        query = self.image_proj(patches)
        key_value = self.text_proj(words)
        return self.back_proj(self.attn(query, key_value, key_value))


class DenseAligner(nn.Module):
    """The vision adapter. Input: the block's `norm2` output [B, P, D] (P = prefix tokens + grid²) and the word
    features [B, L, text_dim]; output [B, P, D], to be scaled and added to the block's MLP output (before LayerScale)."""

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
        attn_implementation: str = "sdpa",
    ):
        super().__init__()
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.down_proj = nn.Linear(hidden_size, width)
        self.act = nn.ReLU()
        self.dense_moc = DenseMixtureOfConvolutions(width, 2, batch_norm_eps)
        self.cross_attention = WordCrossAttention(width, text_dim, attention_dim, num_heads, dropout, attn_implementation)
        self.up_proj = nn.Linear(width, hidden_size)

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

    @torch.no_grad()
    def reset_parameters(self, init_mode: str = "official"):
        """Official effective init: linears N(0, 0.02) (truncated), convs Kaiming-normal (fan_in, ReLU), BatchNorm 1/0,
        attention in-projection Xavier-uniform; all biases 0. `init_mode="zeros"` also zeroes `up_proj`, so the
        adapter starts as a no-op. Parameters already loaded from a checkpoint are left alone."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init.trunc_normal_(module.weight, std=0.02)
                init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                _reset_batch_norm(module)
            elif isinstance(module, PackedMultiheadAttention):
                init.xavier_uniform_(module.in_proj_weight)
                init.zeros_(module.in_proj_bias)
        if init_mode == "zeros":
            init.zeros_(self.up_proj.weight)
            init.zeros_(self.up_proj.bias)


class TextAdapter(nn.Module):
    """The text adapter. Input: the post-attention residual stream [B, L, D] (not layer-normed); output [B, L, D], to
    be scaled and added beside the MLP residual. The convolutions run over every token but the first (SOT)."""

    def __init__(self, hidden_size: int, width: int, batch_norm_eps: float = 1e-3):
        super().__init__()
        self.down_proj = nn.Linear(hidden_size, width)
        self.act = nn.ReLU()
        self.dense_moc = DenseMixtureOfConvolutions(width, 1, batch_norm_eps)
        self.up_proj = nn.Linear(width, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x0 = self.act(self.down_proj(hidden_states))
        tokens = x0[:, 1:].transpose(1, 2)
        mixed = self.dense_moc(tokens).transpose(1, 2)
        # The one residual: + x0 after concatenation (so SOT comes out as 2 * x0).
        out = torch.cat([x0[:, :1], mixed], dim=1) + x0
        return self.up_proj(out)

    @torch.no_grad()
    def reset_parameters(self, init_mode: str = "official"):
        """Official init = PyTorch's defaults (Kaiming-uniform a=sqrt(5), uniform biases), BatchNorm 1/0.
        `init_mode="zeros"` zeroes `up_proj` so the adapter starts as a no-op."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                init.uniform_(module.bias, -bound, bound)
            elif isinstance(module, nn.BatchNorm1d):
                _reset_batch_norm(module)
        if init_mode == "zeros":
            init.zeros_(self.up_proj.weight)
            init.zeros_(self.up_proj.bias)


def _reset_batch_norm(module):
    init.ones_(module.weight)
    init.zeros_(module.bias)
    init.zeros_(module.running_mean)
    init.ones_(module.running_var)
    init.zeros_(module.num_batches_tracked)
