"""Reference architectures: shapes on both datasets' image sizes, and which channels are prunable."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from orprune.examples.zoo import SmallCNN, resnet20, vgg_small
from orprune.network.graph import find_groups


@pytest.mark.parametrize("build", [SmallCNN, resnet20, vgg_small])
@pytest.mark.parametrize("size", [8, 28])
def test_ten_logits_for_both_image_sizes(build, size):
    assert build().eval()(torch.randn(3, 1, size, size)).shape == (3, 10)


def test_every_conv_of_the_small_vgg_is_a_prunable_unit():
    model = vgg_small().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the classifier's outputs are excluded
        graph = find_groups(model, torch.randn(1, 1, 28, 28))
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(u.name for u in graph.units) == sorted(convs)
    assert graph.units[-1].consumers[0].name == "classifier"
