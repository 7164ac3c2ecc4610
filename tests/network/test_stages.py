"""UCP's stages: the units whose consumers all write into one residual stream, grouped by width."""

from __future__ import annotations

import warnings

import pytest
import torch

from orprune.examples.zoo import CifarResNet, vgg_small
from orprune.network.graph import find_groups
from orprune.network.stages import stage_ties
from tests.models import one_thread  # noqa: F401  (module fixture)

X = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("residual", [True, False])
def test_basic_block_resnet_stages(residual):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = find_groups(CifarResNet(14, 10, 1).eval(), X, residual=residual)
    # two basic blocks per stage; the stream is a unit (residual=True) or a group left alone: same stages
    assert stage_ties(graph) == [("layer1.0.conv1", "layer1.1.conv1"), ("layer2.0.conv1", "layer2.1.conv1"),
                                 ("layer3.0.conv1", "layer3.1.conv1")]


def test_a_plain_chain_has_no_stage():
    assert stage_ties(find_groups(vgg_small().eval(), X)) == []


def test_a_graph_is_required():
    with pytest.raises(ValueError, match="`graph`"):
        stage_ties([])
