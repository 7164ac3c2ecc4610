"""The fine-tune benchmark's search over the removal tolerance: the largest removal that meets the floor."""

from __future__ import annotations

from pathlib import Path

import pytest

import benchmarks.perspective_finetune as ft

REF = {"val": 0.93, "test": 0.92}  # common floor at tolerance 0.005: 0.925


@pytest.fixture
def search(monkeypatch, tmp_path):
    """Stub the trained model and the searches: a rung at tolerance ``t`` removes ``1000 t`` groups and
    fine-tunes to ``val[0](t)``; ``calls`` records the tolerances tried."""
    calls: list[float] = []
    val = [lambda t: 0.93]
    monkeypatch.setattr(ft.base, "_searches", lambda *a, **k: {"common": {}})
    monkeypatch.setattr(ft.base, "trained", lambda *a, **k: (None, 0.0, Path(tmp_path / "m.pt")))

    def rung(model, tolerance, args, data):
        calls.append(tolerance)
        return dict(tolerance=tolerance, removed=int(1000 * tolerance), val_pruned=0.5, val_tuned=val[0](tolerance),
                    seconds=1.0)

    monkeypatch.setattr(ft, "rung", rung)
    return calls, val


def run(low=0.16, high=0.64, steps=2):
    args = ft.argparse.Namespace(tolerance=0.005, score="relative_norm", finetune_epochs=1.0, finetune_lr=0.01,
                                 finetune_low=low, finetune_high=high, finetune_steps=steps)
    return ft.recovered("x", "spr", {}, args, {}, REF)


def test_bisection_between_a_pass_and_a_failure(search):
    calls, val = search
    val[0] = lambda t: 0.93 if t <= 0.3 else 0.90  # passes up to 0.3
    out = run()
    assert calls == [0.16, 0.64, 0.4, 0.28]
    assert out["best"]["tolerance"] == 0.28
    assert [r["tolerance"] for r in out["rungs"]] == [0.16, 0.28, 0.4, 0.64]


def test_high_passing_ends_the_search(search):
    calls, _ = search
    assert run()["best"]["tolerance"] == 0.64 and calls == [0.16, 0.64]


def test_low_failing_halves_down_to_the_tolerance(search):
    calls, val = search
    val[0] = lambda t: 0.93 if t <= 0.04 else 0.90
    out = run()
    assert calls == [0.16, 0.08, 0.04, 0.06, 0.05]  # then bisect between 0.04 and 0.08
    assert out["best"]["tolerance"] == 0.04
    val[0] = lambda t: 0.90
    calls.clear()
    assert run(low=0.07)["best"] is None  # nothing passes: the no-fine-tune answer stands
    assert calls == [0.07, 0.035, 0.0175, 0.00875]


def test_rungs_are_cached(search, tmp_path):
    calls, _ = search
    run(high=0.16)
    run(high=0.16)
    assert calls == [0.16]  # the second run reads the JSON beside the weights
    assert len(list(tmp_path.glob("m_relnorm_ft1_lr0.01_tol0.16.json"))) == 1


def test_options_are_checked():
    with pytest.raises(SystemExit):
        ft.parse(["--init", "scratch"])
    with pytest.raises(SystemExit):
        ft.parse(["--init", "pretrained", "--finetune-epochs", "0"])
    with pytest.raises(SystemExit):
        ft.parse(["--init", "pretrained", "--finetune-low", "0.7"])


def test_table_row_flags_the_top_of_the_range_and_the_fallback():
    common = dict(removed=3, macs=(100, 90), val_after=0.926, test_after=0.915)
    best = dict(tolerance=0.64, removed=50, total=448, macs=(100, 60), val_tuned=0.93, test_tuned=0.918, seconds=2.0)
    row = ft.table_row("x", dict(row=dict(test_trained=0.92, common=common), rungs=[best], best=best), REF, 0.64)
    assert "64 (top of the range" in row and "| 40.0% |" in row and "| 10.0% |" in row
    row = ft.table_row("x", dict(row=dict(test_trained=0.92, common=common), rungs=[best], best=None), REF, 0.64)
    assert "no rung passed" in row and "| 3 | 10.0% | 0.9260 | 0.9150 | 0.50 |" in row
