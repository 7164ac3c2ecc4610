"""The training loop's regularizer window (``train(regularizer_until=...)``)."""

import copy

import pytest
import torch
from torch import nn

from orprune.training import reinitialize, step_counts, train


class CountingPenalty:
    """A regularizer that records how often the loop asks for it (the squared norm of a weight)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.calls = weight, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.weight.pow(2).sum()


def _setup(n: int = 50):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    return model, torch.randn(n, 1, 4, 4), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("until, expected", [(1.0, 12), (0.5, 6), (0.67, 8), (0.01, 0)])
def test_the_regularizer_acts_on_the_first_fraction_of_the_steps(until, expected):
    model, x, y = _setup()  # 50 images, batch 16: 4 steps per epoch, 3 epochs = 12 steps
    penalty = CountingPenalty(model[1].weight)
    train(model, x, y, epochs=3, batch_size=16, regularizer=penalty, regularizer_strength=1.0,
          regularizer_until=until, progress=False)
    assert penalty.calls == expected
    assert step_counts(len(y), 3, 16, until) == (12, expected)  # what optimizer-hook regularizers use


def test_a_strong_penalty_moves_the_weights_only_inside_its_window():
    model_a, x, y = _setup()
    model_b, _, _ = _setup()
    train(model_a, x, y, epochs=2, batch_size=16, regularizer=CountingPenalty(model_a[1].weight),
          regularizer_strength=10.0, regularizer_until=1.0, progress=False, flip=False)
    train(model_b, x, y, epochs=2, batch_size=16, regularizer=CountingPenalty(model_b[1].weight),
          regularizer_strength=10.0, regularizer_until=0.5, progress=False, flip=False)
    # the penalty shrinks the weight; without it for the last half, the weight regrows
    assert model_a[1].weight.norm() < model_b[1].weight.norm()


@pytest.mark.parametrize("until", [0.0, -0.5, 1.5, float("nan")])
def test_a_window_outside_zero_one_is_an_error(until):
    model, x, y = _setup()
    with pytest.raises(ValueError, match="regularizer_until"):
        train(model, x, y, epochs=1, batch_size=16, regularizer=CountingPenalty(model[1].weight),
              regularizer_strength=1.0, regularizer_until=until, progress=False)


def test_from_scratch_reinitialises_then_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))
    with torch.no_grad():  # "pruned" weights far from any initialisation
        for p in model.parameters():
            p.fill_(0.7)
        model[1].running_mean.fill_(3.0)
    pruned = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = reinitialize(nn.Sequential(*[m for m in copy.deepcopy(model)]), seed=5)
    state = torch.random.get_rng_state()
    train(model, x, y, epochs=2, batch_size=16, from_scratch=True, seed=5, progress=False, flip=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is not consumed
    for name in ("0.weight", "4.weight"):
        assert not torch.allclose(model.state_dict()[name], pruned[name])  # re-initialised ...
        assert not torch.allclose(model.state_dict()[name], fresh.state_dict()[name])  # ... then trained
    # the re-initialisation is the seed's: the same draw as reinitialize(seed=5), not the pruned weights
    again = reinitialize(copy.deepcopy(fresh), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), fresh.state_dict().values()))
    assert float(fresh.state_dict()["1.running_mean"].abs().max()) == 0.0
    # fine-tuning (the default) starts from the pruned weights: after a tiny step they are still close
    tuned = copy.deepcopy(model)
    tuned.load_state_dict(pruned)
    train(tuned, x, y, epochs=1, batch_size=64, lr=1e-6, progress=False, flip=False)
    assert torch.allclose(tuned.state_dict()["0.weight"], pruned["0.weight"], atol=1e-4)


def test_reinitialize_needs_parameters_and_from_scratch_a_bool():
    with pytest.raises(ValueError, match="reset_parameters"):
        reinitialize(nn.Sequential(nn.ReLU()))
    model, x, y = _setup()
    with pytest.raises(ValueError, match="`from_scratch`"):
        train(model, x, y, epochs=1, from_scratch="yes", progress=False)
