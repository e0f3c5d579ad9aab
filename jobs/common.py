"""What the job entry points share: a YAML config, command-line overrides, the Ray connection.

A job is ``python jobs/<name>.py --config jobs/configs/<name>.yaml [--input ...] [--set key=value]``.
Named options override the config's top-level keys; ``--set`` overrides any key, dotted for the
analysis settings (``--set analysis.composite=epsilon-plus-flat``); values are read as YAML.
Under ``ray job submit`` Ray sets RAY_ADDRESS, which the pipeline joins.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def job_parser(description: str, options: dict[str, str]) -> argparse.ArgumentParser:
    """A parser with --config, --set and one ``--<option>`` per entry of ``options`` (name -> help)."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", required=True, type=Path, help="the job's YAML config (jobs/configs/)")
    for name, help in options.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key (dotted for analysis.*), value parsed as YAML")
    return parser


def load_config(args: argparse.Namespace, options: dict[str, str]) -> dict:
    """The config file with the command line's overrides applied."""
    if not args.config.is_file():
        sys.exit(f"config {args.config} not found; the job configs are in jobs/configs/")
    config = yaml.safe_load(args.config.read_text()) or {}
    if not isinstance(config, dict):
        sys.exit(f"config {args.config} must be a mapping of settings, got {type(config).__name__}")
    for name in options:
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--set takes KEY=VALUE, got {item!r}")
        *parents, leaf = key.split(".")
        section = config
        for parent in parents:
            section = section.setdefault(parent, {})
        section[leaf] = yaml.safe_load(value)
    return config


def pop_job_settings(config: dict, **defaults):
    """Remove the job-only keys (not RunConfig fields) from ``config``: returns their values in order."""
    return [config.pop(name, default) for name, default in defaults.items()]
