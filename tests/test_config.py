"""lrpscale.config: every invalid setting is a ConfigError naming its key and value, configs are
frozen and round-trip through plain mappings, and one loader reads YAML + overrides + --set."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from lrpscale.config import AnalysisConfig, ConfigError, RunConfig, load_settings

# Today's defaults, written out by hand from the configs as they were before they moved to lrpscale/config.py: they are
# hashed into run ids, so a change here is a change of every default run's id.
ANALYSIS_DEFAULTS = {
    "composite": "epsilon-gamma-box", "sweep_layers": None, "ks": [1, 4, 16, 64], "score_metric": "smape",
    "score_target": 50.0, "path_layers": None, "path_k": 4, "absolute": False, "deconv_layers": None,
    "deconv_per_layer": 1, "deconv_mode": "all", "heatmap_size": 56, "deconv_size": 32, "target": "pred",
    # the audit's region perturbation stage (added with the faithfulness checks: new run ids from then on)
    "faithfulness_sample": 0.04, "faithfulness_steps": 10, "faithfulness_fraction": 0.5,
    "faithfulness_patch_size": None, "faithfulness_seed": 0,
}
RUN_DEFAULTS = {
    "input": "in", "output": "out", "model": "vgg16", "weights": None, "input_kind": None, "image_size": None,
    "batch_size": 16, "shard_size": 256, "num_actors": None, "actor_resources": None, "max_pixels": 89_478_485,
    "tf32": False, "follow_external_links": False, "analysis": ANALYSIS_DEFAULTS,
}

BAD_ANALYSIS = [
    ("composite", "gamma"), ("composite", None),
    ("score_metric", "smap"), ("score_metric", "SMAPE"),
    ("deconv_mode", "top"),
    ("target", "truth"),
    ("ks", "abc"), ("ks", 4), ("ks", []), ("ks", [0, 1]), ("ks", [-4]), ("ks", [1, 2.5]), ("ks", [True, 2]),
    ("ks", [4, 1]), ("ks", [1, 1, 2]), ("ks", {1, 2}),
    ("path_k", 0), ("path_k", True), ("path_k", 2.0), ("path_k", "4"),
    ("deconv_per_layer", -1), ("deconv_per_layer", None),
    ("heatmap_size", "56"), ("heatmap_size", 0),
    ("deconv_size", 32.5),
    ("score_target", -1), ("score_target", math.nan), ("score_target", math.inf), ("score_target", "50"),
    ("score_target", True),
    ("absolute", "yes"), ("absolute", 1),
    ("faithfulness_sample", -0.1), ("faithfulness_sample", 1.5), ("faithfulness_sample", "all"),
    ("faithfulness_sample", True), ("faithfulness_fraction", 0), ("faithfulness_fraction", 2),
    ("faithfulness_steps", 0), ("faithfulness_patch_size", 0), ("faithfulness_seed", -1), ("faithfulness_seed", 1.5),
    ("sweep_layers", "conv5_3"), ("sweep_layers", []), ("sweep_layers", [""]), ("sweep_layers", [3]),
    ("path_layers", "fc6,fc7"), ("path_layers", 7),
    ("deconv_layers", ["conv5_3", None]),
]


@pytest.mark.parametrize(("name", "value"), BAD_ANALYSIS)
def test_bad_analysis_setting_names_key_and_value(name, value):
    with pytest.raises(ConfigError) as caught:
        AnalysisConfig(**{name: value})
    assert caught.value.key == f"analysis.{name}"
    assert str(caught.value).startswith(f"analysis.{name}: ")
    assert repr(value) in str(caught.value)


@pytest.mark.parametrize(("name", "value"), BAD_ANALYSIS)
def test_bad_analysis_setting_in_a_run_mapping(name, value):
    with pytest.raises(ConfigError, match=f"^analysis\\.{name}: "):
        RunConfig.from_mapping({"input": "in", "output": "out", "analysis": {name: value}})


def test_analysis_errors_follow_the_prefix():
    with pytest.raises(ConfigError) as caught:
        AnalysisConfig.from_mapping({"ks": [4, 1]}, prefix="")
    assert caught.value.key == "ks" and str(caught.value).startswith("ks: [4, 1] ")
    with pytest.raises(ConfigError, match="^explain.kz: unknown setting"):
        AnalysisConfig.from_mapping({"kz": [1]}, prefix="explain")


def test_choice_error_lists_the_choices():
    with pytest.raises(ConfigError) as caught:
        AnalysisConfig(score_metric="smap")
    assert str(caught.value) == "analysis.score_metric: 'smap' is not one of 'smape', 'mse'"
    assert isinstance(caught.value, ValueError)


def test_single_layer_string_is_refused_with_the_list_to_write():
    with pytest.raises(ConfigError, match=r"write \['conv5_3', 'fc7'\]"):
        AnalysisConfig(sweep_layers="conv5_3,fc7")


# (setting, value, key the error names, text the message shows)
BAD_RUN = [
    ("input", "", "input", "''"), ("input", None, "input", "None"), ("input", 3, "input", "3"),
    ("output", "", "output", "''"),
    ("model", "vgg17", "model", "'vgg17'"), ("model", "resnet50", "model", "'resnet50'"),
    ("weights", "", "weights", "''"), ("weights", 1, "weights", "1"),
    ("input_kind", "zip", "input_kind", "'zip'"),
    ("image_size", 0, "image_size", "0"), ("image_size", "224", "image_size", "'224'"),
    ("batch_size", 0, "batch_size", "0"), ("batch_size", True, "batch_size", "True"),
    ("batch_size", None, "batch_size", "None"),
    ("shard_size", -5, "shard_size", "-5"), ("shard_size", 2.5, "shard_size", "2.5"),
    ("num_actors", 0, "num_actors", "0"), ("num_actors", "2", "num_actors", "'2'"),
    ("actor_resources", "num_gpus=1", "actor_resources", "'num_gpus=1'"),
    ("actor_resources", [1], "actor_resources", "[1]"),
    ("actor_resources", {"num_gpu": 1}, "actor_resources.num_gpu", "actor_resources.num_gpu"),
    ("actor_resources", {"num_gpus": -1}, "actor_resources.num_gpus", "-1"),
    ("actor_resources", {"memory": "4G"}, "actor_resources.memory", "'4G'"),
    ("actor_resources", {"resources": 1}, "actor_resources.resources", "1"),
    ("actor_resources", {"resources": {"slot": "one"}}, "actor_resources.resources.slot", "'one'"),
    ("max_pixels", 0, "max_pixels", "0"), ("max_pixels", 1.5, "max_pixels", "1.5"),
    ("tf32", "false", "tf32", "'false'"), ("tf32", 0, "tf32", "0"),
]


@pytest.mark.parametrize(("name", "value", "key", "shown"), BAD_RUN)
def test_bad_run_setting_names_key_and_value(name, value, key, shown):
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_mapping({"input": "in", "output": "out", name: value})
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: ")
    assert shown in str(caught.value)


@pytest.mark.parametrize("analysis", ["smape", [1, 2], 3])
def test_analysis_section_must_be_a_mapping(analysis):
    with pytest.raises(ConfigError, match=f"^analysis: {analysis!r}".replace("[", r"\[")):
        RunConfig.from_mapping({"input": "in", "output": "out", "analysis": analysis})


def test_run_analysis_must_be_an_analysis_config():
    with pytest.raises(ConfigError, match="^analysis: "):
        RunConfig(input="in", output="out", analysis={"composite": "epsilon-plus-flat"})


@pytest.mark.parametrize("name", ["input", "output"])
def test_missing_required_setting(name):
    values = {"input": "in", "output": "out"}
    del values[name]
    with pytest.raises(ConfigError, match=f"^{name}: missing"):
        RunConfig.from_mapping(values)


def test_defaults_match_todays():
    assert AnalysisConfig().to_dict() == ANALYSIS_DEFAULTS
    assert RunConfig(input="in", output="out").to_dict() == RUN_DEFAULTS
    assert RunConfig.from_mapping({"input": "in", "output": "out", "analysis": None}).to_dict() == RUN_DEFAULTS


def test_analysis_round_trip_and_normalisation():
    config = AnalysisConfig.from_mapping({
        "composite": "epsilon-alpha2-beta1-flat", "sweep_layers": ["conv5_3", "fc7"], "ks": range(1, 6),
        "score_metric": "mse", "score_target": 0, "path_layers": ("conv4_3", "conv5_3"), "path_k": 2,
        "absolute": True, "deconv_layers": ["conv5_3"], "deconv_per_layer": 3, "deconv_mode": "max",
        "heatmap_size": 16, "deconv_size": 8, "target": "label"})
    assert config.sweep_layers == ("conv5_3", "fc7") and config.ks == (1, 2, 3, 4, 5)
    as_dict = config.to_dict()
    assert as_dict["sweep_layers"] == ["conv5_3", "fc7"] and as_dict["ks"] == [1, 2, 3, 4, 5]
    assert as_dict["score_target"] == 0 and type(as_dict["score_target"]) is int  # as given: run ids stay put
    again = AnalysisConfig.from_mapping(as_dict)
    assert again == config and hash(again) == hash(config)
    assert dataclasses.replace(config, path_k=5).path_k == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.path_k = 5


def test_run_round_trip_gives_plain_copies():
    resources = {"num_cpus": 2, "resources": {"accel_slot": 1}}
    config = RunConfig.from_mapping({
        "input": "/data/images", "output": "/data/runs/a", "model": "vgg11_bn", "weights": "demo",
        "input_kind": "webdataset", "image_size": 224, "batch_size": 32, "shard_size": 64, "num_actors": 3,
        "actor_resources": resources, "max_pixels": None, "tf32": True, "analysis": {"ks": [1, 2]}})
    resources["resources"]["accel_slot"] = 99  # the caller's dict is not the config's
    as_dict = config.to_dict()
    assert as_dict["actor_resources"] == {"num_cpus": 2, "resources": {"accel_slot": 1}}
    assert type(as_dict["actor_resources"]) is dict and as_dict["analysis"]["ks"] == [1, 2]
    as_dict["actor_resources"]["num_cpus"] = 7  # nor is the returned one
    assert config.actor_resources["num_cpus"] == 2
    assert RunConfig.from_mapping(config.to_dict()) == config


def test_misspelt_keys_get_a_suggestion_and_the_valid_list():
    with pytest.raises(ConfigError) as caught:
        AnalysisConfig.from_mapping({"compsite": "epsilon-plus-flat"})
    assert caught.value.key == "analysis.compsite"
    assert "did you mean analysis.composite?" in str(caught.value)
    assert "score_metric" in str(caught.value)  # the valid settings are listed
    with pytest.raises(ConfigError, match="did you mean batch_size"):
        RunConfig.from_mapping({"input": "in", "output": "out", "batchsize": 4})
    with pytest.raises(ConfigError, match="^analysis.score_metrc: .*did you mean analysis.score_metric"):
        RunConfig.from_mapping({"input": "in", "output": "out", "analysis": {"score_metrc": "mse"}})


def test_every_unknown_key_is_named():
    with pytest.raises(ConfigError) as caught:
        AnalysisConfig.from_mapping({"sweep_layer": ["fc7"], "zzzzzz": 1})
    message = str(caught.value)
    assert caught.value.key == "analysis.sweep_layer" and "did you mean analysis.sweep_layers?" in message
    assert "analysis.zzzzzz" in message and "analysis.zzzzzz (did you mean" not in message


def test_load_settings_applies_overrides_then_sets(tmp_path):
    path = tmp_path / "audit.yaml"
    path.write_text("input: /data/images\noutput: /data/runs/a\nbatch_size: 32\n"
                    "analysis:\n  composite: epsilon-gamma-box\n  path_k: 4\nreport: true\n")
    overrides = {"input": "/data/other", "weights": None, "actor_resources": {"num_gpus": 1}}
    settings = load_settings(path, overrides, [
        "batch_size=64", "analysis.composite=epsilon-plus-flat", "analysis.ks=[1, 2, 8]",
        "actor_resources.resources.accel_slot=1", "tf32=true", "weights="])
    assert settings == {
        "input": "/data/other", "output": "/data/runs/a", "batch_size": 64, "report": True, "tf32": True,
        "weights": None,
        "analysis": {"composite": "epsilon-plus-flat", "path_k": 4, "ks": [1, 2, 8]},
        "actor_resources": {"num_gpus": 1, "resources": {"accel_slot": 1}},
    }
    assert overrides["actor_resources"] == {"num_gpus": 1}  # --set did not reach into the caller's mapping
    settings.pop("report")  # a job-only key
    config = RunConfig.from_mapping(settings)
    assert config.analysis.ks == (1, 2, 8) and config.analysis.composite == "epsilon-plus-flat"


def test_load_settings_without_a_file_and_with_an_empty_section(tmp_path):
    assert load_settings(None, sets=["analysis.path_k=2"]) == {"analysis": {"path_k": 2}}
    path = tmp_path / "empty-section.yaml"
    path.write_text("analysis:\n")
    assert load_settings(str(path), sets=["analysis.target=label"]) == {"analysis": {"target": "label"}}
    (tmp_path / "empty.yaml").write_text("")
    assert load_settings(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize(("text", "problem"), [("- a\n- b\n", "mapping"), ("a: [1\n", "YAML")])
def test_load_settings_bad_file_names_it(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem) as caught:
        load_settings(path)
    assert caught.value.key == str(path) and str(path) in str(caught.value)


def test_load_settings_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="not found") as caught:
        load_settings(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(caught.value)


@pytest.mark.parametrize("item", ["batch_size", "=3"])
def test_set_without_key_and_value_is_refused(item):
    with pytest.raises(ConfigError, match=f"^--set: {item!r} is not KEY=VALUE"):
        load_settings(None, sets=[item])


def test_set_through_a_scalar_is_refused():
    with pytest.raises(ConfigError, match="^batch_size: 3 is not a mapping"):
        load_settings(None, {"batch_size": 3}, ["batch_size.x=1"])


def test_import_loads_no_heavy_library():
    code = ("import sys, lrpscale.config; "
            "print(sorted(m for m in ('torch', 'ray', 'pyarrow', 'pandas') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
