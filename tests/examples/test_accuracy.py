"""Reconstruction pays off on real data: a trained CNN pruned to half its MACs, no fine-tuning."""

import warnings

import torch

import orprune
from orprune.examples.baselines import recalibrate_batchnorm, torch_pruning_baseline
from orprune.examples.datasets import load_digits
from orprune.examples.zoo import SmallCNN
from orprune.network.costs import count_macs_params
from orprune.training import batches, evaluate, train


def test_orprune_beats_torch_pruning_magnitude_at_half_the_macs_on_digits():
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    torch.manual_seed(0)
    model = train(SmallCNN(1, 10), train_x, train_y, epochs=10, seed=0, flip=False, progress=False, threads=1)
    base = evaluate(model, test_x, test_y)
    assert base > 0.95  # a trained model, or the comparison below means nothing
    calibration = list(batches(train_x, 128, 512))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = orprune.prune(model, calibration, macs=0.5, solver="greedy", progress=False)
    example = test_x[:1]
    baseline = torch_pruning_baseline(model, example, macs=0.5)
    assert count_macs_params(result.model, example)[0] <= 0.5 * count_macs_params(model, example)[0]
    ours = evaluate(result.model, test_x, test_y)
    theirs = evaluate(baseline, test_x, test_y)
    theirs_repaired = evaluate(recalibrate_batchnorm(baseline, calibration), test_x, test_y)
    assert ours >= base - 0.03  # close to the unpruned model without any fine-tuning
    assert ours > theirs + 0.10  # clearly above magnitude pruning ...
    assert ours > theirs_repaired  # ... even after its BatchNorm statistics are re-estimated
