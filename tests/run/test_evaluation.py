"""``evaluate_run`` and ``lrpscale evaluate`` on a real audit of digits with the bundled demo model."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from lrpscale.cli import main
from lrpscale.results import open_run

SETTINGS = {"methods": ["epsilon-gamma-box"], "sample": 12, "cascade_sample": 4, "mprt_sample": 4}


@pytest.fixture(scope="module")
def evaluated(demo_runs, tmp_path_factory):
    """A copy of the demo run (the fixture's runs stay untouched) and its evaluation at SETTINGS."""
    from lrpscale.run.evaluation import evaluate_run

    run = tmp_path_factory.mktemp("evaluate") / "run"
    shutil.copytree(demo_runs["run"], run)
    return run, evaluate_run(run, **SETTINGS)


@pytest.mark.slow
def test_tables_have_one_row_per_image_method_order_and_step(evaluated):
    from lrpscale.engine.models import load_model
    from lrpscale.engine.randomisation import parameter_layers

    run, evaluation = evaluated
    methods = ["epsilon-gamma-box", "gradient", "gradient_x_input"]  # the baselines are always added
    assert evaluation.settings["methods"] == methods
    steps, images = evaluation.settings["steps"], 12
    assert len(evaluation.faithfulness) == images * len(methods) * 3 * (steps + 1)
    assert len(evaluation.aopc) == images * len(methods) * 3
    assert evaluation.aopc["image_id"].nunique() == images
    layers = len(parameter_layers(load_model(open_run(run).architecture, "demo")))
    checks = evaluation.randomisation
    assert len(checks[checks["check"] == "cascade"]) == 4 * len(methods) * layers
    assert len(checks[checks["check"] == "emprt"]) == 4 * len(methods)
    assert checks.loc[checks["check"] == "emprt", "layer"].isna().all()
    assert set(checks.loc[checks["check"] == "cascade", "step"]) == set(range(1, layers + 1))
    # the cascade and eMPRT images are the first four of the sample
    first = list(evaluation.aopc["image_id"].drop_duplicates()[:4])
    assert set(checks["image_id"]) == set(first)
    folder = run / "evaluation" / evaluation.settings_id
    assert {p.name for p in folder.iterdir()} == {"faithfulness.parquet", "aopc.parquet", "randomisation.parquet",
                                                  "settings.json", "summary.json"}


@pytest.mark.slow
def test_aopc_is_the_mean_logit_drop_over_steps(evaluated):
    _, evaluation = evaluated
    curves = evaluation.faithfulness
    start = curves[curves["step"] == 0].set_index(["image_id", "method", "order"])["logit"]
    later = curves[curves["step"] > 0].join(start.rename("logit0"), on=["image_id", "method", "order"])
    recomputed = (later["logit0"] - later["logit"]).groupby([later["image_id"], later["method"], later["order"]]).mean()
    stored = evaluation.aopc.set_index(["image_id", "method", "order"])["aopc"]
    pd.testing.assert_series_equal(stored.sort_index(), recomputed.sort_index().rename("aopc"), rtol=1e-6)


@pytest.mark.slow
def test_lrp_beats_the_random_order_and_is_named_most_faithful(evaluated):
    _, evaluation = evaluated
    lrp = evaluation.aopc[evaluation.aopc["method"] == "epsilon-gamma-box"].groupby("order")["aopc"].mean()
    assert lrp["morf"] > lrp["random"]
    summary = evaluation.summary()
    assert list(summary.index) == evaluation.settings["methods"]
    assert summary.loc["epsilon-gamma-box", "morf_minus_random"] == pytest.approx(lrp["morf"] - lrp["random"])
    assert evaluation.most_faithful == "epsilon-gamma-box"
    assert np.isfinite(summary["cascade_final_abs_spearman"]).all()


@pytest.mark.slow
def test_the_same_seed_draws_the_same_sample(evaluated):
    from lrpscale.run.evaluation import draw_sample

    run, evaluation = evaluated
    drawn = list(evaluation.aopc["image_id"].drop_duplicates())
    assert list(draw_sample(open_run(run), 12, seed=0)["image_id"]) == drawn
    assert list(draw_sample(open_run(run), 12, seed=1)["image_id"]) != drawn


@pytest.mark.slow
def test_other_settings_go_to_another_folder_and_run_reads_them(evaluated, capsys):
    from lrpscale.run.evaluation import evaluate_run

    run, first = evaluated
    # the CLI with other settings (a smaller sample, fewer steps): a second evaluation beside the first
    code = main(["evaluate", str(run), "--methods", "epsilon-gamma-box", "--sample", "6", "--steps", "5",
                 "--cascade-sample", "0", "--mprt-sample", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "most faithful composite: epsilon-gamma-box" in out
    assert "aopc_morf" in out and str(run / "evaluation") in out

    evaluations = open_run(run).evaluations()
    assert len(evaluations) == 2 and first.settings_id in set(evaluations["settings_id"])
    second = evaluations["settings_id"].iloc[-1]
    assert second != first.settings_id
    assert (run / "evaluation" / first.settings_id / "aopc.parquet").is_file()  # the first stays
    latest = open_run(run).evaluation("aopc")
    assert len(latest) == 6 * 3 * 3
    earlier = open_run(run).evaluation("aopc", first.settings_id)
    pd.testing.assert_frame_equal(earlier, first.aopc)

    # the same settings again replace the first evaluation's rows (same folder, same sample)
    again = evaluate_run(run, **SETTINGS)
    assert again.settings_id == first.settings_id
    assert len(open_run(run).evaluations()) == 2
    pd.testing.assert_frame_equal(open_run(run).evaluation("aopc", first.settings_id), first.aopc)


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert f"{tmp_path} is not an lrpscale run" in capsys.readouterr().err
