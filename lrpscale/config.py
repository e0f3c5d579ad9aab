"""Validated, frozen settings for an analysis and a run, and the one loader for YAML + ``--set``.

Imports only the standard library and ``yaml`` (no torch, Ray or Arrow), so every other part can
import it and a bad value fails, as a ``ConfigError`` naming the key, before anything starts.
"""
from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

COMPOSITE_NAMES = ("epsilon-gamma-box", "epsilon-plus-flat", "epsilon-alpha2-beta1", "epsilon-alpha2-beta1-flat")
SCORE_METRICS = ("smape", "mse")
DECONV_MODES = ("all", "max")
TARGETS = ("pred", "label")
INPUT_KINDS = ("folder", "manifest", "parquet", "webdataset")
MODEL_NAMES = ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources")  # what an actor may request from Ray

# PIL's own default (1024 * 1024 * 1024 // 4 // 3), pinned so a change elsewhere in the process
# does not silently move ours.
DEFAULT_MAX_PIXELS = 89_478_485


class ConfigError(ValueError):
    """An invalid setting. ``key`` is the setting (dotted for nested ones, ``analysis.ks``; the
    file's path for a config file that cannot be read); the message is ``"<key>: <problem>"``,
    where the problem shows the bad value and what is allowed."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class AnalysisConfig:
    """What to compute per image. Layer names may be aliases (``conv5_3``, ``fc7``).

    sweep_layers: layers whose k is chosen by the fidelity sweep (default: the last conv layer).
    ks: the sweep. score_metric/score_target: k* is the smallest k whose fidelity score reaches
    the target (SMAPE <= 50 by default), else the largest k. path_layers: default block-final
    convs, fc6, fc7. path_k: neurons per path layer on the critical path (at a swept layer, the
    top min(k*, path_k) of its k* selected neurons; elsewhere its top path_k). absolute: rank by
    |r| instead of r. deconv_layers/deconv_per_layer/deconv_mode: which selected neurons are
    reconstructed (default the top neuron of the last conv layer). heatmap_size/deconv_size:
    side of the stored low-resolution pictures. target: "pred" or "label".
    faithfulness_*: the audit's region perturbation stage (docs/method.md §16): the share of
    images drawn (seeded per image_id by ``faithfulness_seed``; 0 turns the stage off, 1 takes
    every image), its steps, the fraction of the image removed and the patch side (None: the
    image side // 28). The default share costs about 0.47 heatmaps per run image (11.7 per
    sampled image).

    Checked on construction (``ConfigError`` keyed ``analysis.<field>``). Sequences are stored
    as tuples, so a config is hashable. A layer list is None or a non-empty list of names; a
    single string is refused rather than split, so ``"conv5_3"`` never becomes seven layers.
    """

    composite: str = "epsilon-gamma-box"
    sweep_layers: Sequence[str] | None = None
    ks: Sequence[int] = (1, 4, 16, 64)
    score_metric: str = "smape"
    score_target: float = 50.0
    path_layers: Sequence[str] | None = None
    path_k: int = 4
    absolute: bool = False
    deconv_layers: Sequence[str] | None = None
    deconv_per_layer: int = 1
    deconv_mode: str = "all"
    heatmap_size: int = 56
    deconv_size: int = 32
    target: str = "pred"
    faithfulness_sample: float = 0.04
    faithfulness_steps: int = 10
    faithfulness_fraction: float = 0.5
    faithfulness_patch_size: int | None = None
    faithfulness_seed: int = 0

    def __post_init__(self):
        key = "analysis.{}".format
        checked = {
            "composite": _choice(key("composite"), self.composite, COMPOSITE_NAMES),
            "sweep_layers": _layers(key("sweep_layers"), self.sweep_layers),
            "ks": _ks(key("ks"), self.ks),
            "score_metric": _choice(key("score_metric"), self.score_metric, SCORE_METRICS),
            "score_target": _amount(key("score_target"), self.score_target),
            "path_layers": _layers(key("path_layers"), self.path_layers),
            "path_k": _positive_int(key("path_k"), self.path_k),
            "absolute": _bool(key("absolute"), self.absolute),
            "deconv_layers": _layers(key("deconv_layers"), self.deconv_layers),
            "deconv_per_layer": _positive_int(key("deconv_per_layer"), self.deconv_per_layer),
            "deconv_mode": _choice(key("deconv_mode"), self.deconv_mode, DECONV_MODES),
            "heatmap_size": _positive_int(key("heatmap_size"), self.heatmap_size),
            "deconv_size": _positive_int(key("deconv_size"), self.deconv_size),
            "target": _choice(key("target"), self.target, TARGETS),
            "faithfulness_sample": _share(key("faithfulness_sample"), self.faithfulness_sample, zero=True),
            "faithfulness_steps": _positive_int(key("faithfulness_steps"), self.faithfulness_steps),
            "faithfulness_fraction": _share(key("faithfulness_fraction"), self.faithfulness_fraction, zero=False),
            "faithfulness_patch_size": _positive_int(key("faithfulness_patch_size"), self.faithfulness_patch_size,
                                                     optional=True),
            "faithfulness_seed": _seed(key("faithfulness_seed"), self.faithfulness_seed),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: the normalised value replaces the given one

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], prefix: str = "analysis") -> AnalysisConfig:
        """An AnalysisConfig from a mapping of its fields (missing ones take their defaults).

        ``prefix`` is where the mapping sits in the caller's settings ("" for top level): every
        error's key is ``<prefix>.<field>``. Unknown keys are an error naming each, with a close
        match where there is one.
        """
        if not isinstance(values, Mapping):
            raise ConfigError(prefix or "settings", f"{values!r} is not a mapping of analysis settings")
        _reject_unknown(values, [f.name for f in fields(cls)], prefix)
        try:
            return cls(**values)
        except ConfigError as error:
            if prefix == "analysis":
                raise
            # __post_init__ keys its errors "analysis.<field>"; re-key them where the caller put them
            raise ConfigError(_dotted(prefix, error.key.removeprefix("analysis.")), error.problem) from None

    def to_dict(self) -> dict:
        """The fields as plain Python, tuples as lists: the shape written to run.json and hashed
        into the run id."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RunConfig:
    """One audit. ``actor_resources`` is the per-actor request (default ``{"num_gpus": 1}`` when
    the cluster has GPUs, else one CPU); ``num_actors`` defaults to one per GPU, else one.

    Checked on construction (``ConfigError`` keyed by field). ``actor_resources`` is kept as a
    plain dict, copied from the one given, because Ray's option checks want a dict; so a
    RunConfig compares by value but is not hashable when it has one.
    """

    input: str
    output: str
    model: str = "vgg16"
    weights: str | None = None
    input_kind: str | None = None
    image_size: int | None = None
    batch_size: int = 16
    shard_size: int = 256
    num_actors: int | None = None
    actor_resources: dict | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    tf32: bool = False
    follow_external_links: bool = False
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def __post_init__(self):
        if not isinstance(self.analysis, AnalysisConfig):
            raise ConfigError("analysis", f"{self.analysis!r} is not an AnalysisConfig; build one with "
                                          "AnalysisConfig.from_mapping, or use RunConfig.from_mapping")
        checked = {
            "input": _text("input", self.input),
            "output": _text("output", self.output),
            "model": _choice("model", self.model, MODEL_NAMES),
            "weights": None if self.weights is None else _text("weights", self.weights),
            "input_kind": None if self.input_kind is None else _choice("input_kind", self.input_kind, INPUT_KINDS),
            "image_size": _positive_int("image_size", self.image_size, optional=True),
            "batch_size": _positive_int("batch_size", self.batch_size),
            "shard_size": _positive_int("shard_size", self.shard_size),
            "num_actors": _positive_int("num_actors", self.num_actors, optional=True),
            "actor_resources": _actor_resources("actor_resources", self.actor_resources),
            "max_pixels": _positive_int("max_pixels", self.max_pixels, optional=True),
            "tf32": _bool("tf32", self.tf32),
            "follow_external_links": _bool("follow_external_links", self.follow_external_links),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> RunConfig:
        """A RunConfig from a job's settings (``load_settings``'s result, job-only keys removed);
        ``analysis`` is a mapping of AnalysisConfig fields. Unknown keys are an error naming
        each, so a typo in a config does not pass silently."""
        values = dict(values)
        analysis = values.pop("analysis", None)
        _reject_unknown(values, [f.name for f in fields(cls)], "")
        missing = [name for name in ("input", "output") if name not in values]
        if missing:
            raise ConfigError(missing[0], "missing: set it in the config file or on the command line")
        return cls(**values, analysis=AnalysisConfig.from_mapping({} if analysis is None else analysis))

    def to_dict(self) -> dict:
        """The fields as plain Python, ``analysis`` as its ``to_dict()``: what run.json records."""
        out = asdict(self)
        out["analysis"] = self.analysis.to_dict()
        return out


def load_settings(path: str | Path | None, overrides: Mapping[str, object] = {},
                  sets: Sequence[str] = ()) -> dict:
    """The settings of a YAML config file with the command line's changes applied, in order.

    path: a YAML file holding a mapping (None: start from no settings). overrides: named
    options, applied to top-level keys where the value is not None. sets: ``KEY=VALUE`` items
    (``--set``), the key dotted into nested mappings (``analysis.composite``), the value read as
    YAML. Returns a new mapping; nothing given is changed. Raises ConfigError for a missing or
    unreadable file, a file that is not a mapping, or a malformed item.
    """
    settings: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(str(path), "config file not found")
        try:
            settings = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(str(path), f"is not valid YAML: {error}") from None
        if not isinstance(settings, dict):
            raise ConfigError(str(path), f"must hold a mapping of settings, got {type(settings).__name__}")
    settings.update((name, value) for name, value in overrides.items() if value is not None)
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set", f"{item!r} is not KEY=VALUE (e.g. analysis.composite=epsilon-plus-flat)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(key, f"{text!r} is not a YAML value: {error}") from None
        *parents, leaf = key.split(".")
        section = settings
        for depth, parent in enumerate(parents):
            child = section.get(parent)
            if child is not None and not isinstance(child, Mapping):
                raise ConfigError(".".join(parents[:depth + 1]), f"{child!r} is not a mapping, so {key} cannot be set")
            # a copy, so a mapping that came in through overrides is not changed under its owner
            section[parent] = dict(child or {})
            section = section[parent]
        section[leaf] = value
    return settings


# ---------------------------------------------------------------------------------------------
# Checks: each takes the setting's key and value and returns the value to store, or raises.

def _dotted(prefix: str, name: object) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _reject_unknown(given: Iterable, valid: Sequence[str], prefix: str) -> None:
    """Raise naming every key of ``given`` not in ``valid`` (with a close match if any) and the valid ones."""
    unknown = sorted((name for name in given if name not in valid), key=str)
    if not unknown:
        return

    def guess(name) -> str:
        close = difflib.get_close_matches(str(name), valid, n=1)
        return f" (did you mean {_dotted(prefix, close[0])}?)" if close else ""

    others = [_dotted(prefix, name) + guess(name) for name in unknown[1:]]
    also = f"; also unknown: {', '.join(others)}" if others else ""
    where = f"{prefix} settings" if prefix else "settings"
    raise ConfigError(_dotted(prefix, unknown[0]),
                      f"unknown setting{guess(unknown[0])}{also}; the valid {where} are {', '.join(valid)}")


def _choice(key: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def _text(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"{value!r} is not a non-empty string")
    return value


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"{value!r} is not true or false")
    return value


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `batch_size: true` is a mistake, not 1
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(key: str, value: object, *, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ConfigError(key, f"{value!r} is not {'null or ' if optional else ''}an integer >= 1")
    return int(value)


def _amount(key: str, value: object) -> int | float:
    """A finite number >= 0; an int stays an int so the run id of ``score_target: 50`` does not move."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ConfigError(key, f"{value!r} is not a finite number >= 0")
    return int(value) if _is_int(value) else float(value)


def _share(key: str, value: object, *, zero: bool) -> int | float:
    """A number in [0, 1] (``zero=False``: in (0, 1]); an int stays an int, as in ``_amount``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1
            or (value == 0 and not zero)):
        bounds = "[0, 1]" if zero else "(0, 1]"
        raise ConfigError(key, f"{value!r} is not a number in {bounds}")
    return int(value) if _is_int(value) else float(value)


def _seed(key: str, value: object) -> int:
    if not _is_int(value) or value < 0:
        raise ConfigError(key, f"{value!r} is not an integer >= 0")
    return int(value)


def _is_list(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _ks(key: str, value: object) -> tuple[int, ...]:
    if not _is_list(value) or not value or not all(_is_int(k) and k >= 1 for k in value):
        raise ConfigError(key, f"{value!r} is not a non-empty list of integers >= 1")
    ks = tuple(int(k) for k in value)
    if any(a >= b for a, b in zip(ks, ks[1:])):
        raise ConfigError(key, f"{value!r} is not strictly increasing: sort it and drop repeats")
    return ks


def _layers(key: str, value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        names = [name.strip() for name in value.split(",")]
        raise ConfigError(key, f"{value!r} is a single string, not a list of layer names: write {names!r}")
    if not _is_list(value) or not value or not all(isinstance(name, str) and name for name in value):
        raise ConfigError(key, f"{value!r} is not null or a non-empty list of layer names")
    return tuple(value)


def _actor_resources(key: str, value: object) -> dict | None:
    """None, or a mapping of RESOURCE_KEYS to amounts (``resources``: custom name -> amount), copied."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"{value!r} is not null or a mapping with keys among {', '.join(RESOURCE_KEYS)}")
    _reject_unknown(value, RESOURCE_KEYS, key)
    out = {}
    for name, amount in value.items():
        if name != "resources":
            out[name] = _amount(f"{key}.{name}", amount)
        elif not isinstance(amount, Mapping) or not all(isinstance(custom, str) and custom for custom in amount):
            raise ConfigError(f"{key}.resources", f"{amount!r} is not a mapping of resource name to amount")
        else:
            out[name] = {custom: _amount(f"{key}.resources.{custom}", n) for custom, n in amount.items()}
    return out
