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
    """The config file with the command line's overrides applied (``lrpscale.config.load_settings``,
    the loader the CLI uses); a bad file or item exits with a message naming it."""
    from lrpscale.config import ConfigError, load_settings

    try:
        return load_settings(args.config, {name: getattr(args, name) for name in options}, args.set)
    except ConfigError as error:
        sys.exit(f"{args.config}: {error}")


def run_config(config: dict):
    """RunConfig.from_mapping, exiting with the message (which names the key) on a bad setting:
    before Ray starts and before anything is written."""
    from lrpscale.config import ConfigError, RunConfig

    try:
        return RunConfig.from_mapping(config)
    except ConfigError as error:
        sys.exit(f"bad setting: {error}")


def pop_job_settings(config: dict, **defaults):
    """Remove the job-only keys (not RunConfig fields) from ``config``: returns their values in order."""
    return [config.pop(name, default) for name, default in defaults.items()]
