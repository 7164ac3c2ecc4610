"""The guard over built allocations: never worse on the probe than either pure mode, measured independently."""

import warnings

import pytest
import torch

import orprune
from orprune.mixed import MixedPruner
from orprune.mixed_guard import probe_metrics
from tests.models import TinyNet, one_thread  # noqa: F401  (one_thread: fixture)


def calibration(shape, n_batches=3, batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=gen) for _ in range(n_batches)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = MixedPruner(positions_per_image=None, solver="exact", max_options=4, max_ranks=4,
                             progress=False).fit(model, calibration((2, 5, 5)))
    return fitted, model


def relative_error(model, reference, x):
    with torch.no_grad():
        ref = reference(x).double()
        return float((model(x).double() - ref).square().sum() / ref.square().sum())


@pytest.mark.parametrize("macs", [0.8, 0.6, 0.45])
def test_guard_is_never_worse_on_the_probe_than_either_pure_mode(tiny, macs):
    fitted, model = tiny
    probe = calibration((2, 5, 5), n_batches=2, seed=7)  # held out: another draw than the calibration
    x = torch.cat(probe)
    guarded = orprune.guarded_prune(fitted, probe, macs=macs)
    assert guarded.held_out and guarded.probe_images == len(x)
    chosen = relative_error(guarded.model, model, x)
    assert chosen == pytest.approx(min(c.output_error for c in guarded.candidates), rel=1e-6)
    for mode in ("mixed", "channels", "factorize"):  # each mode built on its own, through the public API
        alone = fitted.prune(macs=macs, mode=mode)
        assert dict(alone.keep) == dict(guarded.by_mode()[mode].result.keep)
        assert dict(alone.ranks) == dict(guarded.by_mode()[mode].result.ranks)
        assert chosen <= relative_error(alone.model, model, x) * (1 + 1e-6)
        assert guarded.model.eval() is not None and guarded.result.macs_after <= macs * alone.macs_before * (1 + 1e-9)
    # distinct candidates: modes that chose the same allocation share one built model
    keys = [(tuple(c.result.keep.items()), tuple(c.result.ranks.items())) for c in guarded.candidates]
    assert len(set(keys)) == len(keys)
    assert sorted(m for c in guarded.candidates for m in c.modes) == sorted(("mixed", "channels", "factorize",
                                                                             "calibrated"))
    # the calibrated candidate: the mixed MILP at the exchange rate the two pure candidates measured
    pure = guarded.by_mode()
    rate = [pure[m].output_error / pure[m].result.objective for m in ("factorize", "channels")]
    assert guarded.rank_weight == pytest.approx(rate[0] / rate[1], rel=1e-12)
    keep, ranks, _, _ = fitted.choose(macs=macs, rank_weight=guarded.rank_weight)
    assert (dict(pure["calibrated"].result.keep), dict(pure["calibrated"].result.ranks)) == (keep, ranks)


def test_disagreement_metric_and_in_sample_probe(tiny):
    fitted, model = tiny
    in_sample = orprune.guarded_prune(fitted, macs=0.45, modes=("channels",))
    assert not in_sample.held_out and in_sample.probe_images == 24  # every calibration image (probe_images=512)
    assert [c.modes for c in in_sample.candidates] == [("channels",)] and in_sample.rank_weight is None
    probe = calibration((2, 5, 5), n_batches=2, seed=7)
    guarded = orprune.guarded_prune(fitted, probe, macs=0.45, metric="disagreement")
    best = min(guarded.candidates, key=lambda c: (c.disagreement, c.output_error))
    assert guarded.result is best.result and guarded.chosen == best.modes[0]
    # on this draw the probe overrules the MILP: the mixed optimum (= channels) changes the top-1 class of some
    # probe outputs, factorization of none, so the guard returns the model with the larger MILP objective
    by_mode = guarded.by_mode()
    assert by_mode["mixed"].disagreement > 0 == by_mode["factorize"].disagreement
    assert guarded.chosen == "factorize" and guarded.result.objective > by_mode["mixed"].result.objective
    x = torch.cat(probe)
    with torch.no_grad():
        differ = float((guarded.model(x).argmax(1) != model(x).argmax(1)).double().mean())
    assert guarded.by_mode()[guarded.chosen].disagreement == pytest.approx(differ)


def test_probe_metrics_by_hand():
    ref = [torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)]
    out = [torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=torch.float64)]
    error, differ = probe_metrics(out, ref)
    assert error == pytest.approx(2.0 / 5.0) and differ == 0.5
    assert probe_metrics([torch.ones(3, dtype=torch.float64)], [torch.ones(3, dtype=torch.float64) * 2])[1] != 0.5


def test_bad_inputs(tiny):
    fitted, _ = tiny
    with pytest.raises(ValueError, match="`metric` must be one of"):
        orprune.guarded_prune(fitted, macs=0.6, metric="accuracy")
    with pytest.raises(ValueError, match="`modes` must be distinct modes"):
        orprune.guarded_prune(fitted, macs=0.6, modes=("mixed", "mixed"))
    with pytest.raises(ValueError, match="`modes` must be distinct modes"):
        orprune.guarded_prune(fitted, macs=0.6, modes="mixed")
    with pytest.raises(ValueError, match="`probe` is empty"):
        orprune.guarded_prune(fitted, [], macs=0.6)
    with pytest.raises(ValueError, match="`probe` must be an iterable of batches"):
        orprune.guarded_prune(fitted, torch.zeros(2, 2, 5, 5), macs=0.6)
    with pytest.raises(ValueError, match="`fitted` must be a fitted MixedPruner"):
        orprune.guarded_prune(object(), macs=0.6)
    with pytest.raises(RuntimeError, match="not fitted"):
        orprune.guarded_prune(MixedPruner(), macs=0.6)
    with pytest.raises(ValueError, match="give a budget"):
        orprune.guarded_prune(fitted)
    with pytest.raises(ValueError, match="`calibrate` must be True or False"):
        orprune.guarded_prune(fitted, macs=0.6, calibrate=1)
    with pytest.raises(ValueError, match="`rank_weight` must be a positive finite number"):
        fitted.choose(macs=0.6, rank_weight=0.0)
