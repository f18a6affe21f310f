"""Tests of `keras_fwdgrad.research.searches`: Table I from one search per
gradient type, the best retrained and tested, written as CSV and Markdown."""

import pytest

pytest.importorskip("keras_tuner")

from keras_fwdgrad.research import searches  # noqa: E402

from tests import helpers  # noqa: E402

pytestmark = pytest.mark.slow


def test_compare_searches_and_table(tmp_path):
    train, val, test = (
        helpers.regression(128, 0),
        helpers.regression(64, 1),
        helpers.regression(64, 2),
    )
    rows = searches.compare_searches(
        helpers.linear,
        train,
        val,
        test,
        epochs=1,
        model_name="linear",
        dataset_name="synthetic",
        directory=str(tmp_path),
        loss="mse",
        metrics=(),
        learning_rate_range=(1e-3, 1e-1),
        decay_values=(0.0,),
        jit_compile=False,
    )
    assert [r["gradient"] for r in rows] == ["forward", "backprop"]
    for r in rows:
        assert set(searches.TABLE_COLUMNS) <= set(r)
        assert r["trials"] == 3 and r["test_loss"] > 0
    csv_path, md_path = searches.write_table(rows, str(tmp_path / "table"))
    md = open(md_path).read().splitlines()
    assert md[0] == "| " + " | ".join(searches.TABLE_COLUMNS) + " |"
    assert len(md) == 4
    assert open(csv_path).readline().strip() == ",".join(searches.TABLE_COLUMNS)
