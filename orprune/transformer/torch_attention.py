"""Plain torch attention with prunable heads: ``nn.MultiheadAttention`` split into q/k/v Linears.

``nn.MultiheadAttention`` cannot hold fewer heads than ``embed_dim / head_dim``: its query, key and
value widths are all ``embed_dim`` (``kdim``/``vdim`` are the *input* widths of key and value),
``head_dim = embed_dim // num_heads``, and its output projection maps ``embed_dim`` to
``embed_dim``. So orprune replaces it by :class:`SplitMultiheadAttention`, which computes the same
function with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` Linears of width
``num_heads * head_dim`` (any number of heads, ``embed_dim`` kept), and which the head adapter of
:mod:`orprune.transformer.adapters` recognises. :func:`split_attention` does the replacement in a
model; :class:`orprune.transformer.TransformerPruner` does it on its own copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SplitMultiheadAttention", "split_attention"]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (``True``: not allowed, as in ``nn.MultiheadAttention``) as ``-inf`` / 0."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate q/k/v projections and any number of heads.

    Same ``forward`` signature and results as ``nn.MultiheadAttention`` (``batch_first`` either way,
    unbatched inputs, boolean or float ``attn_mask`` of shape ``(L, S)`` or ``(N * num_heads, L, S)``,
    ``key_padding_mask``, ``need_weights`` and ``average_attn_weights``, dropout on the attention
    weights in training mode). Head ``h`` owns rows ``h*head_dim + [0, head_dim)`` of ``q_proj``,
    ``k_proj``, ``v_proj`` and the same columns of ``out_proj``; pruning heads changes ``num_heads``
    and those widths, never ``embed_dim``. Not supported: ``add_bias_kv`` and ``add_zero_attn``.

    Parameters
    ----------
    embed_dim, num_heads : int
    head_dim : int, optional
        Default ``embed_dim // num_heads``.
    bias : bool, default True
    kdim, vdim : int, optional
        Input widths of key and value (default ``embed_dim``).
    dropout : float, default 0
    batch_first : bool, default False
    """

    # ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` read these before choosing their fused
    # fast path, which needs a packed ``in_proj_weight``: they keep them on the plain path.
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int | None = None, *, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, dropout: float = 0.0,
                 batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if head_dim is None:
            if num_heads < 1 or embed_dim % num_heads:
                raise ValueError(f"`embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads}).")
            head_dim = embed_dim // num_heads
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"`num_heads` and `head_dim` must be >= 1, got {num_heads} and {head_dim}.")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        like = dict(device=device, dtype=dtype)
        width = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, width, bias=bias, **like)
        self.k_proj = nn.Linear(self.kdim, width, bias=bias, **like)
        self.v_proj = nn.Linear(self.vdim, width, bias=bias, **like)
        self.out_proj = nn.Linear(width, embed_dim, bias=bias, **like)

    @classmethod
    def from_multihead_attention(cls, attention: nn.MultiheadAttention) -> SplitMultiheadAttention:
        """The equivalent module, with copies of ``attention``'s weights."""
        if attention.bias_k is not None or attention.add_zero_attn:
            raise ValueError("`attention` uses add_bias_kv or add_zero_attn, which SplitMultiheadAttention "
                             "does not support.")
        weight = attention.out_proj.weight
        split = cls(attention.embed_dim, attention.num_heads, bias=attention.in_proj_bias is not None,
                    kdim=attention.kdim, vdim=attention.vdim, dropout=attention.dropout,
                    batch_first=attention.batch_first, device=weight.device, dtype=weight.dtype)
        e = attention.embed_dim
        if attention._qkv_same_embed_dim:
            weights = attention.in_proj_weight.detach().split(e)
        else:
            weights = (attention.q_proj_weight.detach(), attention.k_proj_weight.detach(),
                       attention.v_proj_weight.detach())
        with torch.no_grad():
            for proj, w, i in zip((split.q_proj, split.k_proj, split.v_proj), weights, range(3)):
                proj.weight.copy_(w)
                if attention.in_proj_bias is not None:
                    proj.bias.copy_(attention.in_proj_bias.detach()[i * e : (i + 1) * e])
            split.out_proj.weight.copy_(weight.detach())
            if split.out_proj.bias is not None and attention.out_proj.bias is not None:
                split.out_proj.bias.copy_(attention.out_proj.bias.detach())
            elif split.out_proj.bias is not None:
                split.out_proj.bias.zero_()
        split.train(attention.training)
        return split

    def _mask(self, attn_mask, key_padding_mask, n: int, length: int, source: int, dtype: torch.dtype):
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 2:
                mask = mask.view(1, 1, length, source)
            elif mask.dim() == 3 and mask.shape[0] == 1:
                mask = mask.unsqueeze(0)
            elif mask.dim() == 3 and mask.shape[0] == n * self.num_heads:
                mask = mask.view(n, self.num_heads, length, source)
            else:
                raise ValueError(f"`attn_mask` must have shape ({length}, {source}) or "
                                 f"({n * self.num_heads}, {length}, {source}), got {tuple(attn_mask.shape)}.")
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).view(n, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``; ``is_causal`` without ``attn_mask`` applies the causal mask."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, source = query.shape[0], query.shape[1], key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, length, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, source, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, source, h, d).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, n, length, source, q.dtype)
        causal = is_causal and attn_mask is None
        if causal and (mask is not None or need_weights):  # combine the causal mask with the padding
            upper = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
            mask = _additive(upper, q.dtype).view(1, 1, length, source) + (0 if mask is None else mask)
            causal = False
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = (F.dropout(weights, dropout) if dropout > 0 else weights) @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, h * d))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"batch_first={self.batch_first}")


def split_attention(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by :class:`SplitMultiheadAttention`.

    Returns ``model``. An ``nn.TransformerEncoder`` holding a replaced layer gets
    ``use_nested_tensor = False``: its nested-tensor path needs the packed weights; the plain path
    computes the same outputs at every non-padded position (padded positions then hold values
    instead of zeros).

    Raises
    ------
    ValueError
        An attention module uses ``add_bias_kv`` or ``add_zero_attn``.
    """
    if isinstance(model, nn.MultiheadAttention):
        raise ValueError("`model` is itself an nn.MultiheadAttention: use "
                         "SplitMultiheadAttention.from_multihead_attention(model).")
    replaced = False
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(parent, name, SplitMultiheadAttention.from_multihead_attention(child))
                replaced = True
    if replaced:
        for module in model.modules():
            if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
                module.use_nested_tensor = False
    return model
