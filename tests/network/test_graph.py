"""Channel groups of the test architectures: which units are found, which are excluded and why."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from orprune.network.graph import PruningGraph, find_groups
from tests.models import SMALL, mobilenet_v2, one_thread, resnet18, resnet20, small_model  # noqa: F401


def groups(name: str, **kwargs) -> tuple[nn.Module, PruningGraph]:
    model, x = small_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # groups left unpruned: the tests read `excluded`
        graph = find_groups(model, x, **kwargs)
    return model, graph


def reasons(graph: PruningGraph) -> dict[str, str]:
    return {e.root: e.reason for e in graph.excluded}


@pytest.mark.parametrize("name, blocks", [("resnet20", [3, 3, 3]), ("resnet18", [2, 2, 2, 2])])
def test_without_residual_streams_resnets_prune_inner_block_channels_only(name, blocks):
    model, graph = groups(name, residual=False)
    inner = [f"layer{s + 1}.{b}.conv1" for s, n in enumerate(blocks) for b in range(n)]
    assert list(graph.names) == inner
    for unit in graph.units:
        block = unit.name.rsplit(".", 1)[0]
        conv2 = model.get_submodule(f"{block}.conv2")
        assert unit.n_channels == conv2.in_channels
        assert unit.carried == (f"{block}.bn1",)
        (consumer,) = unit.consumers
        assert (consumer.name, consumer.kind, consumer.group_size) == (f"{block}.conv2", "conv", 9)
        assert consumer.n_outputs == conv2.out_channels and consumer.norm == f"{block}.bn2"
    why = reasons(graph)
    # the stem and every stage's first shortcut are tied to the residual stream; fc is the output
    stages = ["conv1"] + [f"layer{s + 1}.0.downsample.0" for s in range(1, len(blocks))]
    assert set(why) == set(stages) | {"fc"}
    assert all("residual" in why[s] for s in stages) and "output" in why["fc"]


@pytest.mark.parametrize("name, blocks", [("resnet20", [3, 3, 3]), ("resnet18", [2, 2, 2, 2])])
def test_residual_streams_are_units_read_by_every_block(name, blocks):
    model, x = small_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = find_groups(model, x)
    inner = {f"layer{s + 1}.{b}.conv1" for s, n in enumerate(blocks) for b in range(n)}
    streams = [u for u in graph.units if u.name not in inner]
    assert len(streams) == len(blocks)  # one per stage; the classifier's outputs stay excluded
    shortcut, head = "downsample", "fc"
    for s, (unit, n) in enumerate(zip(streams, blocks), start=1):
        # a stage's first block reads the previous stream (the stem's for stage 1) and, with a
        # projection shortcut, starts the new one
        readers = {f"layer{s}.{b}.conv1" for b in range(0 if s == 1 else 1, n)}
        readers |= {f"layer{s + 1}.0.conv1", f"layer{s + 1}.0.{shortcut}.0"} if s < len(blocks) else {head}
        assert {c.name for c in unit.consumers} == readers
        writers = {f"layer{s}.{b}.conv2" for b in range(n)} | {f"layer{s}.{b}.bn2" for b in range(n)}
        writers |= {"conv1", "bn1"} if s == 1 else {f"layer{s}.0.{shortcut}.0", f"layer{s}.0.{shortcut}.1"}
        assert set(unit.carried) | {unit.root} == writers
        width = model.get_submodule(f"layer{s}.0.conv2").out_channels
        assert unit.n_channels == width and all(c.n_channels == width for c in unit.consumers)
    assert set(reasons(graph)) == {head}


def test_vgg_units_and_max_features():
    model, graph = groups("vgg11_bn", max_features=1000)
    convs = [n for n, m in model.features.named_modules() if isinstance(m, nn.Conv2d)]
    # the last conv's unit feeds the flattened classifier input (C*g = 32*49 > 1000): compressed, not left alone
    assert list(graph.names) == [f"features.{n}" for n in convs] + ["classifier.0", "classifier.3"]
    assert set(reasons(graph)) == {"classifier.6"}
    last = model.get_submodule(f"features.{convs[-1]}")
    (wide,) = graph[f"features.{convs[-1]}"].consumers
    assert (wide.name, wide.kind, wide.group_size) == ("classifier.0", "linear", 49)
    assert wide.wide and wide.sketch == 1000 // last.out_channels
    # the conv consumers read 3x3 patches; the hidden Linear layers read one feature per channel
    assert graph["features.0"].consumers[0].group_size == 9 and not graph["features.0"].consumers[0].wide
    assert graph["classifier.0"].consumers[0].name == "classifier.3"
    # with a larger limit the flattened classifier input is an exact consumer with 7*7 features per channel
    big = find_groups(model, torch.randn(2, 3, 32, 32), max_features=10_000)
    assert "classifier.6" in reasons(big)
    (consumer,) = big[f"features.{convs[-1]}"].consumers
    assert (consumer.name, consumer.kind, consumer.group_size, consumer.sketch) == ("classifier.0", "linear", 49, 49)
    assert consumer.n_features == model.classifier[0].in_features and not consumer.wide
    # one column per channel cannot be compressed: the exact problem, whatever the limit
    tiny = find_groups(model, torch.randn(2, 3, 32, 32), max_features=8)
    assert all(c.sketch == 1 for c in tiny["classifier.0"].consumers)


def test_mobilenet_expanded_channels_are_units():
    model, graph = groups("mobilenet_v2", residual=False)
    blocks = list(model.features)[1:-1]
    expected = []
    if not blocks[0].use_res_connect:
        expected.append("features.0.0")
    for i, block in enumerate(blocks, start=1):
        if len(block.conv) == 4:  # expand conv, depthwise, project conv, BN
            expected.append(f"features.{i}.conv.0.0")
        project = f"features.{i}.conv.{len(block.conv) - 2}"
        nxt = blocks[i] if i < len(blocks) else None
        if not block.use_res_connect and not (nxt is not None and nxt.use_res_connect):
            expected.append(project)
    expected.append(f"features.{len(blocks) + 1}.0")
    assert set(graph.names) == set(expected)
    unit = graph["features.2.conv.0.0"]
    assert unit.carried == ("features.2.conv.0.1", "features.2.conv.1.0", "features.2.conv.1.1")
    assert [c.name for c in unit.consumers] == ["features.2.conv.2"]
    assert graph[f"features.{len(blocks) + 1}.0"].consumers[0].name == "classifier.1"
    assert "classifier.1" in reasons(graph)


def test_architectures_match_the_reference_parameter_counts():
    # torchvision's resnet18 / mobilenet_v2 with 1000 classes, and the CIFAR ResNet-20 on one
    # input channel of shared/design.md section 8
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(resnet18(num_classes=1000)) == 11_689_512
    assert count(mobilenet_v2(num_classes=1000)) == 3_504_872
    assert count(resnet20(in_channels=1)) == 272_186


def test_full_width_models_trace():
    for model, n_units in ((resnet18(), 8), (mobilenet_v2(), 17 + 1 + 1 + 1)):
        with pytest.warns(UserWarning):
            graph = find_groups(model.eval(), torch.randn(1, 3, 32, 32), residual=False)
        assert len(graph.units) == n_units
        assert max(c.n_features for c in graph.consumers) <= 4608


def test_model_is_not_modified():
    model, x = small_model("resnet20")
    model.train()
    state = copy.deepcopy(model.state_dict())
    find_groups(model, x)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("by_name", [True, False])
def test_ignored_layers_exclude_every_group_touching_them(by_name):
    model, x = small_model("vgg11_bn")
    ignored = ["features.4", "classifier"] if by_name else [model.features[4], model.classifier]
    with pytest.warns(UserWarning, match="ignored"):
        graph = find_groups(model, x, ignored_layers=ignored, max_features=1000)
    # features.4 is the consumer of features.0's unit and the root of its own
    assert "features.0" not in graph and "features.4" not in graph
    assert "classifier.0" not in graph and "classifier.3" not in graph
    assert "features.8" in graph


class GroupNormNet(nn.Module):
    """A conv followed by GroupNorm (sliced with the channels, tied by its groups), a grouped conv, a
    LayerNorm over the whole feature map (left alone), then a plain chain."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # grouped: a tied unit (issue 21)
        self.conv3 = nn.Conv2d(8, 6, 3)
        self.ln = nn.LayerNorm([6, 6, 6])  # over (C, H, W): not a norm over the channels alone
        self.conv4 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.conv4(self.ln(torch.relu(self.conv3(self.conv2(self.gn(self.conv1(x)))))))


def test_unsupported_modules_are_excluded_with_one_warning():
    model = GroupNormNet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = find_groups(model, torch.randn(2, 3, 8, 8))
    assert len([w for w in caught if "left unpruned" in str(w.message)]) == 1
    assert graph.names == ("conv1", "conv2")
    assert graph["conv1"].tie == 2 and graph["conv1"].norms[0][0] == "gn"
    assert graph["conv2"].tie == 2 and graph["conv2"].n_channels == 4
    why = reasons(graph)
    assert "not over the channels alone" in why["conv3"] and "output" in why["conv4"]
    assert "conv4" not in str(next(w.message for w in caught if "left unpruned" in str(w.message)))


def test_a_classifier_left_unpruned_is_not_worth_a_warning():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user cannot act on it: the model output keeps its width
        graph = find_groups(model, torch.randn(2, 1, 8, 8))
    assert graph.names == ("0",) and "output" in reasons(graph)["3"]
    assert [e.code for e in graph.excluded] == ["model_output"]  # what find_groups keys on, not the words


def test_a_traced_group_reaching_the_model_output_carries_the_code():
    """A chunk whose parts are the model's output: left alone by the label maps, with the same code."""

    class ChunkOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            a, b = self.conv(x).chunk(2, 1)
            return a * 2, b

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph = find_groups(ChunkOut().eval(), torch.randn(1, 3, 8, 8))
    assert [(e.root, e.code) for e in graph.excluded] == [("conv", "model_output")]


class InputResidual(nn.Module):
    """A residual add onto the model input: no layer produces the identity path's channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.conv3 = nn.Conv2d(3, 5, 1)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.head(self.conv3(x + self.conv2(torch.relu(self.conv1(x)))))


def test_residual_onto_the_input_is_excluded():
    with pytest.warns(UserWarning, match="outside the traced graph"):
        graph = find_groups(InputResidual(), torch.randn(2, 3, 8, 8))
    assert graph.names == ("conv1", "conv3")


def test_bad_arguments():
    model, x = small_model("resnet20")
    with pytest.raises(ValueError, match="`model`"):
        find_groups("resnet", x)
    with pytest.raises(ValueError, match="`max_features`"):
        find_groups(model, x, max_features=0)
    with pytest.raises(ValueError, match="`ignored_layers`"):
        find_groups(model, x, ignored_layers=["no.such.layer"])
    with pytest.raises(ValueError, match="`ignored_layers`"):
        find_groups(model, x, ignored_layers=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="could not trace"):
        find_groups(model, torch.randn(2, 5, 16, 16))


def test_every_small_model_has_units():
    for name in SMALL:
        _, graph = groups(name)
        assert graph.units and all(u.consumers for u in graph.units)
        assert len(set(graph.names)) == len(graph.units)
