"""Calibration statistics against brute-force im2col, sampling, sequential mode and bad inputs."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from orprune.network.calibration import TargetCache, collect_statistics
from orprune.network.graph import find_groups, weight_matrix
from orprune.network.patches import conv_patches, sampled_patches
from tests.models import one_thread, small_model  # noqa: F401


def brute_patches(x: np.ndarray, conv: nn.Conv2d) -> np.ndarray:
    """Rows (image, out_row, out_col) of patches, columns (channel, ki, kj): loops, zero padding."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    b, c, h, w = x.shape
    xp = np.zeros((b, c, h + 2 * ph, w + 2 * pw))
    xp[:, :, ph : ph + h, pw : pw + w] = x
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for n in range(b):
        for i in range(ho):
            for j in range(wo):
                patch = [[[xp[n, ch, i * sh + a * dh, j * sw + e * dw] for e in range(kw)]
                          for a in range(kh)] for ch in range(c)]
                rows.append(np.asarray(patch).ravel())
    return np.asarray(rows)


def captured(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple]:
    """Input and output of each named module on ``x``."""
    seen, handles = {}, []

    def hook(name, args, out):
        seen.setdefault(name, (args[0].detach().double(), out.detach().double()))

    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(n, a, o)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def direct_statistics(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, ...]:
    if isinstance(module, nn.Linear):
        X = x.numpy().reshape(-1, module.in_features)
        Y = y.numpy().reshape(-1, module.out_features)
    else:
        X = brute_patches(x.numpy(), module)
        Y = y.numpy().transpose(0, 2, 3, 1).reshape(-1, module.out_channels)
    if module.bias is not None:
        Y = Y - module.bias.detach().double().numpy()
    return X.T @ X, X.T @ Y, float((Y * Y).sum()), X.mean(0), Y.mean(0)


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn", "mobilenet_v2"])
def test_statistics_equal_direct_computation(name):
    model, x = small_model(name, batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = find_groups(model, x, max_features=2000)
    consumers = [c.name for c in graph.consumers][::3] + [graph.consumers[-1].name]
    stats = collect_statistics(model, consumers, [x[:1], x[1:]], positions_per_image=None, progress=False)
    # the same batches as calibration: float32 convolutions round differently with the batch size
    first, second = captured(model, consumers, x[:1]), captured(model, consumers, x[1:])
    for n in consumers:
        module = model.get_submodule(n)
        acts = [torch.cat([first[n][i], second[n][i]]) for i in (0, 1)]
        gram, cross, yy, mx, my = direct_statistics(module, *acts)
        acc = stats[n]
        g, b, s = acc.statistics()
        np.testing.assert_allclose(g, gram, rtol=1e-9, atol=1e-12 * np.abs(gram).max())
        np.testing.assert_allclose(b, cross, rtol=1e-9, atol=1e-12 * np.abs(cross).max())
        assert s == pytest.approx(yy, rel=1e-9)
        np.testing.assert_allclose(acc.means()[0], mx, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(acc.means()[1], my, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2),
    nn.Conv2d(3, 4, (3, 2), padding="same", padding_mode="reflect"),
    nn.Conv2d(3, 4, 2, stride=(1, 2), padding=(0, 1), padding_mode="circular", bias=False),
])
def test_weight_matrix_times_patches_is_the_conv(conv):
    x = torch.randn(2, 3, 9, 8)
    out = conv(x)
    rows = conv_patches(conv, x).transpose(1, 2)  # (B, L, C*kh*kw)
    y = rows @ weight_matrix(conv) + (0 if conv.bias is None else conv.bias)
    torch.testing.assert_close(y.transpose(1, 2).reshape(out.shape), out, rtol=1e-5, atol=1e-5)
    linear = nn.Linear(5, 3)
    z = torch.randn(4, 5)
    torch.testing.assert_close(z @ weight_matrix(linear) + linear.bias, linear(z))


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2),
    nn.Conv2d(3, 4, (3, 2), padding="same", padding_mode="reflect"),
    nn.Conv2d(3, 4, 2, stride=(1, 2), padding=(0, 1), padding_mode="circular", bias=False),
    nn.Conv2d(3, 4, (1, 3), stride=(2, 1), dilation=(1, 2), padding=(0, 2)),
    nn.Conv2d(3, 4, 1),
])
def test_sampled_patches_are_the_unfolded_rows_at_the_positions(conv):
    x = torch.randn(5, 3, 9, 8)
    full = conv_patches(conv, x)  # (B, F, L)
    gen = torch.Generator().manual_seed(0)
    positions = torch.stack([torch.randperm(full.shape[2], generator=gen)[:4] for _ in range(5)])
    expected = full.gather(2, positions[:, None, :].expand(-1, full.shape[1], -1)).transpose(1, 2)
    assert torch.equal(sampled_patches(conv, x, positions), expected.reshape(-1, full.shape[1]))


def test_conv_with_stride_dilation_and_padding():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2)
    model = nn.Sequential(nn.Identity(), conv)
    x = torch.randn(3, 3, 9, 7)
    (acc,) = collect_statistics(model, ["1"], [x], positions_per_image=None, progress=False).values()
    X = brute_patches(x.double().numpy(), conv)
    Y = X @ weight_matrix(conv).double().numpy()
    g, b, yy = acc.statistics()
    np.testing.assert_allclose(g, X.T @ X, rtol=1e-10)
    np.testing.assert_allclose(b, X.T @ Y, rtol=1e-5, atol=1e-6)
    assert yy == pytest.approx((Y * Y).sum(), rel=1e-5)


def test_sampled_positions_are_real_rows_and_reproducible():
    model, x = small_model("resnet20", batch=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        consumers = find_groups(model, x, residual=False).consumers  # conv consumers only
    batches = [(x[:3], torch.zeros(3)), (x[3:], torch.ones(3))]  # (input, target) pairs
    first = collect_statistics(model, consumers, batches, positions_per_image=5, seed=3, progress=False)
    again = collect_statistics(model, consumers, batches, positions_per_image=5, seed=3, progress=False)
    other = collect_statistics(model, consumers, batches, positions_per_image=5, seed=4, progress=False)
    for c in consumers:
        assert first[c.name].n_samples == 6 * 5
        np.testing.assert_array_equal(first[c.name].statistics()[0], again[c.name].statistics()[0])
        assert not np.allclose(first[c.name].statistics()[0], other[c.name].statistics()[0])
        # every sampled row is an input patch with its own output: full refit reconstructs exactly
        prob = first[c.name].to_problem(group_size=c.group_size, center=True)
        assert prob.full_objective <= 1e-6 * prob.yy


def test_sequential_mode_takes_targets_from_the_reference():
    model, x = small_model("vgg11_bn", batch=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = find_groups(model, x, max_features=1000)
    names = ["features.8", "classifier.3"]
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.features[0].weight.mul_(0.5)
        perturbed.classifier[0].weight.add_(0.1)
    stats = collect_statistics(perturbed, names, [x], reference=model, positions_per_image=None,
                               progress=False)
    inputs = captured(perturbed, names, x)
    targets = captured(model, names, x)
    for n in names:
        module = model.get_submodule(n)
        gram, cross, yy, _, _ = direct_statistics(module, inputs[n][0], targets[n][1])
        g, b, s = stats[n].statistics()
        np.testing.assert_allclose(g, gram, rtol=1e-5, atol=1e-6 * np.abs(gram).max())
        np.testing.assert_allclose(b, cross, rtol=1e-5, atol=1e-6 * np.abs(cross).max())
        assert s == pytest.approx(yy, rel=1e-5)
    # with sampled positions both models use the same positions: the reference against itself
    # gives the statistics of the plain mode
    plain = collect_statistics(model, graph.consumers, [x], positions_per_image=7, progress=False)
    paired = collect_statistics(model, graph.consumers, [x], reference=copy.deepcopy(model),
                                positions_per_image=7, progress=False)
    for c in graph.consumers:
        for a, b in zip(plain[c.name].statistics(), paired[c.name].statistics()):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_cached_targets_replace_the_reference_pass():
    model, x = small_model("resnet20", batch=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        consumers = find_groups(model, x, residual=False).consumers  # conv consumers only
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.conv1.weight.mul_(0.7)
        conv = perturbed.layer1[0].conv2
        conv.bias = nn.Parameter(torch.ones(conv.out_channels))  # the reference's bias is the one used
    batches = [x[:3], x[3:]]
    cache = TargetCache(half=False)
    paired = collect_statistics(perturbed, consumers, batches, reference=model, cache=cache,
                                positions_per_image=5, progress=False)
    assert cache.n_batches == 2 and cache.nbytes > 0
    for _ in range(2):  # the cache is read, not consumed
        cached = collect_statistics(perturbed, consumers, batches, reference=cache, progress=False)
        for c in consumers:
            for a, b in zip(paired[c.name].statistics(center=True), cached[c.name].statistics(center=True)):
                np.testing.assert_array_equal(a, b)
    # filled in the plain mode, the cache gives back the plain statistics on the same model
    own_cache = TargetCache(half=False)
    plain = collect_statistics(model, consumers, batches, cache=own_cache, positions_per_image=5, progress=False)
    again = collect_statistics(model, consumers[:2], batches, reference=own_cache, progress=False)
    for c in consumers[:2]:
        for a, b in zip(plain[c.name].statistics(), again[c.name].statistics()):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="no targets of consumers"):
        collect_statistics(model, ["fc"], batches, reference=own_cache, progress=False)
    with pytest.raises(ValueError, match="holds 2 batches"):
        collect_statistics(model, consumers, batches + [x[:1]], reference=own_cache, progress=False)
    with pytest.raises(ValueError, match="`cache`"):
        collect_statistics(model, consumers, batches, reference=own_cache, cache=own_cache, progress=False)


def test_half_target_cache_is_half_the_memory_and_agrees_to_float16_precision():
    model, x = small_model("resnet20", batch=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        consumers = find_groups(model, x, residual=False).consumers
    batches = [x[:3], x[3:]]
    exact, half = TargetCache(half=False), TargetCache()
    assert half.half  # the default
    plain = collect_statistics(model, consumers, batches, cache=exact, positions_per_image=5, progress=False)
    collect_statistics(model, consumers, batches, cache=half, positions_per_image=5, progress=False)
    rows = sum(y[0].numel() for b in exact._rows.values() for calls in b.values() for _, _, y in calls)
    assert exact.nbytes - half.nbytes == 2 * rows  # float32 -> float16, the positions alike
    again = collect_statistics(model, consumers, batches, reference=half, progress=False)
    for c in consumers:
        gram, cross, yy = plain[c.name].statistics()
        gram_h, cross_h, yy_h = again[c.name].statistics()
        np.testing.assert_array_equal(gram, gram_h)  # the inputs are not cached
        assert np.linalg.norm(cross_h - cross) <= 2**-11 * np.linalg.norm(cross)
        assert abs(yy_h - yy) <= 2**-10 * yy
        assert not np.array_equal(cross_h, cross)  # rounded indeed


def test_modes_are_restored_and_model_unchanged():
    model, x = small_model("resnet20")
    model.train()
    state = copy.deepcopy(model.state_dict())
    collect_statistics(model, ["layer1.0.conv2"], [x], progress=True, max_batches=1)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_max_batches_and_dataloader():
    model, x = small_model("resnet20", batch=8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(8)), batch_size=2)
    stats = collect_statistics(model, ["layer2.0.conv2"], loader, max_batches=3, positions_per_image=4,
                               progress=False)
    assert stats["layer2.0.conv2"].n_samples == 3 * 2 * 4


def test_errors():
    model, x = small_model("resnet20")
    with pytest.raises(ValueError, match="`batches` is empty"):
        collect_statistics(model, ["layer1.0.conv2"], [], progress=False)
    with pytest.raises(ValueError, match="NaN or inf"):
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        collect_statistics(model, ["layer1.0.conv2"], [bad], progress=False)
    with pytest.raises(ValueError, match="not a module"):
        collect_statistics(model, ["layer9.conv"], [x], progress=False)
    with pytest.raises(ValueError, match="a consumer must be a Linear or a Conv2d"):
        collect_statistics(model, ["layer1.0.bn1"], [x], progress=False)
    with pytest.raises(ValueError, match="`consumers`"):
        collect_statistics(model, [], [x], progress=False)
    with pytest.raises(ValueError, match="`positions_per_image`"):
        collect_statistics(model, ["layer1.0.conv2"], [x], positions_per_image=0, progress=False)
    with pytest.raises(ValueError, match="`max_batches`"):
        collect_statistics(model, ["layer1.0.conv2"], [x], max_batches=0, progress=False)
    with pytest.raises(ValueError, match="`reference`"):
        collect_statistics(model, ["layer1.0.conv2"], [x], reference="original", progress=False)

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, z):
            return self.used(z)

    with pytest.raises(ValueError, match="never called"):
        collect_statistics(Skips(), ["used", "unused"], [torch.randn(4, 3)], progress=False)
    with pytest.raises(ValueError, match="does not match"):
        # reference and model disagree on the consumer's output size
        small = nn.Sequential(nn.Conv2d(3, 2, 3))
        padded = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1))
        collect_statistics(small, ["0"], [torch.randn(1, 3, 8, 8)], reference=padded, progress=False)
