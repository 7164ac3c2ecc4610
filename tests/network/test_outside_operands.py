"""A layer's own weight and bias behind an element-wise op are not outside operands (issue 21).

timm's fused BatchNorm + activation calls ``F.batch_norm`` inside the module, its channels-last
LayerNorm calls ``F.layer_norm`` between two permutes, and a Linear on a ``(B, T, C)`` input runs an
``addmm``: torch-pruning labels each of these ops element-wise, with the module's own parameters as
operands. Those parameters are sliced with the module, so the groups through them are prunable; a
parameter that belongs to no enclosing module (a functional layer's, a bare offset) still excludes its
group.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import orprune
from orprune.examples.coverage_zoo import FusedNet
from orprune.network.graph import find_groups
from orprune.network.surgery import masked_copy
from tests.models import one_thread  # noqa: F401  (module fixture)

OUTSIDE = "outside the traced graph"


def _model(**kwargs) -> FusedNet:
    torch.manual_seed(0)
    model = FusedNet(**kwargs)
    with torch.no_grad():  # non-trivial running statistics, as after training
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _groups(model: nn.Module, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return find_groups(model, x)


def test_fused_batchnorm_and_token_mlp_groups_are_units():
    graph = _groups(_model(), torch.randn(2, 3, 6, 6))
    assert set(graph.names) == {"conv1", "fc1", "fc2"}  # fc2: the token stream conv2 and fc2 add into
    assert graph["conv1"].carried == ("bn1",)
    assert [c.name for c in graph["conv1"].consumers] == ["conv2"]
    assert [c.name for c in graph["fc1"].consumers] == ["fc2"]
    assert not any(OUTSIDE in e.reason for e in graph.excluded)


def test_channels_last_layer_norm_is_not_an_outside_operand():
    graph = _groups(_model(layer_norm=True), torch.randn(2, 3, 6, 6))
    assert not any(OUTSIDE in e.reason for e in graph.excluded)
    assert "conv1" in graph.names and "fc1" in graph.names


def test_a_per_channel_parameter_of_no_module_is_sliced_with_the_unit():
    # a learned offset (like a layer scale) on conv2's channels: torch-pruning slices it along
    graph = _groups(_model(offset=True), torch.randn(2, 3, 6, 6))
    assert set(graph.names) == {"conv1", "fc1", "fc2"}
    assert not any(OUTSIDE in e.reason for e in graph.excluded)


def test_a_buffer_operand_still_excludes_its_group():
    model = _model(offset=True)
    offset = model.offset.detach().clone()
    del model.offset
    model.register_buffer("offset", offset)  # not a parameter: nothing slices it
    graph = _groups(model, torch.randn(2, 3, 6, 6))
    [group] = [e for e in graph.excluded if "conv2" in e.modules]  # the token stream conv2 and fc2 add into
    assert OUTSIDE in group.reason


def test_input_added_to_a_residual_is_still_outside():
    class InputResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv2(self.conv1(x) + x)

    graph = _groups(InputResidual().eval(), torch.randn(1, 3, 4, 4))
    assert "conv1" not in graph.names
    assert OUTSIDE in graph.excluded[0].reason


@pytest.mark.parametrize("offset", [False, True])
def test_fused_model_prunes_to_half_macs_and_pruned_equals_masked(offset):
    model = _model(offset=offset)
    state = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 6, 6, generator=gen) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8).fit(model, batches)
    result = pruner.prune(macs=0.5)
    assert result.macs_after <= 0.5 * result.macs_before
    assert result.plan.keep["fc1"].size < 24  # the token MLP's hidden channels are pruned
    x = batches[0]
    with torch.no_grad():
        pruned, masked, original = result.model(x), masked_copy(model, pruner.graph_, result.plan)(x), model(x)
    assert pruned.shape == original.shape
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-4 * float(masked.abs().max()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
