"""Plain torch attention: nn.MultiheadAttention split into q/k/v, nn.TransformerEncoderLayer, a hand-written block."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orprune.transformer import (
    SplitMultiheadAttention,
    TransformerPruner,
    apply_updates,
    find_units,
    kept_widths,
    restore_widths,
    split_attention,
)

torch.set_num_threads(1)
E, HEADS, FF = 32, 4, 48


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim,bias", [(None, True), (24, False)])
def test_split_attention_equals_multihead_attention(batch_first, kdim, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, bias=bias, kdim=kdim, vdim=kdim, batch_first=batch_first).eval()
    split = SplitMultiheadAttention.from_multihead_attention(mha).eval()
    n, length, source = 3, 5, 7
    query = torch.randn(n, length, E) if batch_first else torch.randn(length, n, E)
    key = torch.randn(n, source, kdim or E) if batch_first else torch.randn(source, n, kdim or E)
    padding = torch.zeros(n, source, dtype=torch.bool)
    padding[0, -2:] = True
    per_head = torch.rand(n * HEADS, length, source) > 0.8
    for options in ({}, dict(key_padding_mask=padding), dict(attn_mask=torch.randn(length, source)),
                    dict(attn_mask=per_head, key_padding_mask=padding), dict(need_weights=False, attn_mask=per_head),
                    dict(average_attn_weights=False, key_padding_mask=padding)):
        expected, got = mha(query, key, key, **options), split(query, key, key, **options)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
    if kdim is None:  # unbatched self-attention with the causal hint
        x = torch.randn(5, E)
        causal = nn.Transformer.generate_square_subsequent_mask(5)
        torch.testing.assert_close(split(x, x, x, is_causal=True)[0], mha(x, x, x, attn_mask=causal)[0])


def encoder(batch_first: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.0, batch_first=batch_first, norm_first=batch_first)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.LayerNorm(E)).eval()


class Attention(nn.Module):
    """A hand-written attention with grouped key/value heads and F.scaled_dot_product_attention."""

    def __init__(self, dim: int = E, num_heads: int = 8, num_key_value_heads: int = 4, head_dim: int = 8):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = num_heads, num_key_value_heads, head_dim
        self.q_proj = nn.Linear(dim, num_heads * head_dim)
        self.k_proj = nn.Linear(dim, num_key_value_heads * head_dim)
        self.v_proj = nn.Linear(dim, num_key_value_heads * head_dim)
        self.o_proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q = self.q_proj(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (p(x).view(n, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
                for p in (self.k_proj, self.v_proj))
        rep = self.num_heads // self.num_key_value_heads  # query head h reads key/value head h // rep
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(n, length, -1))


class Block(nn.Module):
    """A minimal pre-norm block: x + attn(norm(x)), then x + fc2(gelu(fc1(norm(x))))."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(E), nn.LayerNorm(E)
        self.attn = Attention()
        self.fc1, self.fc2 = nn.Linear(E, FF), nn.Linear(FF, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def handwritten(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Block(), Block()).eval()


def data(batch_first: bool = True, n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((4, 10, E) if batch_first else (10, 4, E), generator=gen) for _ in range(n)]


def check_pruned_equals_masked(pruner, result, batch):
    masked = apply_updates(copy.deepcopy(pruner.model_), pruner.units_, result.updates, mask=True)
    with torch.no_grad():
        torch.testing.assert_close(result.model(batch), masked(batch), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", ["orprune", "magnitude", "flap", "taylor"])
def test_transformer_encoder_layer_heads_and_neurons(batch_first, method):
    model = encoder(batch_first)
    loss = lambda net, batch: net(batch).pow(2).mean()  # noqa: E731
    pruner = TransformerPruner(loss=loss).fit(model, data(batch_first))
    assert isinstance(model[0].layers[0].self_attn, nn.MultiheadAttention)  # the input model is untouched
    units = pruner.units_
    assert [u.kind for u in units] == ["heads", "neurons"] * 2
    assert [u.n_channels for u in units] == [HEADS, FF] * 2 and units[0].group_size == E // HEADS
    batch = data(batch_first, n=1, seed=7)[0]
    for kinds, fraction in ((("heads",), 0.85), (("heads", "neurons"), 0.7)):
        result = pruner.prune(params=fraction, method=method, kinds=kinds)
        assert result.success, result.message
        assert result.params_after <= fraction * result.params_before
        assert result.params_after == sum(p.numel() for p in result.model.parameters())
        shrunk = {r.kind for r in result.report if r.channels_after < r.channels_before}
        assert shrunk <= set(kinds) and ("heads" in shrunk or kinds != ("heads",))
        check_pruned_equals_masked(pruner, result, batch)
    attention = result.model[0].layers[0].self_attn
    assert attention.embed_dim == E and attention.q_proj.out_features == attention.num_heads * attention.head_dim


def test_restore_widths_of_a_pruned_encoder():
    model = encoder(True)
    result = TransformerPruner().fit(model, data()).prune(params=0.6)
    widths = kept_widths(result.model)
    fresh = restore_widths(encoder(True, seed=3), widths, state_dict=result.model.state_dict())
    batch = data(n=1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), result.model(batch))


@pytest.mark.parametrize("method", ["orprune", "wanda_sp", "taylor"])
def test_handwritten_sdpa_block_with_four_kv_groups(method):
    model = handwritten()
    loss = lambda net, batch: net(batch).pow(2).mean()  # noqa: E731
    pruner = TransformerPruner(loss=loss, sequential=method == "orprune").fit(model, data())
    heads = pruner.units_[0]
    assert (heads.n_channels, heads.heads_per_channel, heads.group_size) == (4, 2, 16)
    batch = data(n=1, seed=7)[0]
    for fraction in (0.8, 0.6):
        kinds = ("heads",) if fraction == 0.8 else ("heads", "neurons")
        result = pruner.prune(params=fraction, method=method, kinds=kinds)
        assert result.params_after <= fraction * result.params_before
        check_pruned_equals_masked(pruner, result, batch)
        for block, report in zip(result.model, result.report[::2]):
            attn = block.attn
            assert attn.num_key_value_heads == report.channels_after >= 1
            assert attn.num_heads == 2 * attn.num_key_value_heads  # whole groups go: the ratio stays
            assert attn.k_proj.out_features == attn.num_key_value_heads * attn.head_dim


def test_split_errors():
    with pytest.raises(ValueError, match="add_bias_kv"):
        split_attention(nn.Sequential(nn.MultiheadAttention(E, HEADS, add_bias_kv=True)))
    with pytest.raises(ValueError, match="split_attention"):
        find_units(encoder(True))
    with pytest.raises(ValueError, match="`attn_mask`"):
        split = SplitMultiheadAttention(E, HEADS, batch_first=True)
        x = torch.randn(2, 3, E)
        split(x, x, x, attn_mask=torch.zeros(5, 3, 3))
