"""Multi-head attention with packed q/k/v projections, batch first, fused (SDPA) or eager.

The parameter layout (`in_proj_weight`, `in_proj_bias`, `out_proj`) is that of `torch.nn.MultiheadAttention`, which
the official heads and Dense Aligners use, so official weights load unchanged. The computation is done with
`scaled_dot_product_attention` unless `attn_implementation` is `"eager"`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class PackedMultiheadAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, attn_implementation: str = "sdpa"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.attn_implementation = attn_implementation
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self):
        """PyTorch's `nn.MultiheadAttention` initialisation."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`query` [B, Lq, E], `key`/`value` [B, Lk, E]; `key_padding_mask` [B, Lk] with True = ignore. Returns [B, Lq, E]."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._split_heads(F.linear(query, w_q, b_q))
        k = self._split_heads(F.linear(key, w_k, b_k))
        v = self._split_heads(F.linear(value, w_v, b_v))
        dropout = self.dropout if self.training else 0.0

        attn_bias = None
        if key_padding_mask is not None:
            attn_bias = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
            attn_bias = attn_bias.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]

        if self.attn_implementation == "eager":
            scores = torch.matmul(q * (1.0 / math.sqrt(self.head_dim)), k.transpose(-1, -2))
            if attn_bias is not None:
                scores = scores + attn_bias
            weights = F.dropout(scores.softmax(dim=-1), p=dropout, training=self.training)
            out = torch.matmul(weights, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout)
        batch, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, length, self.embed_dim)
        return self.out_proj(out)
