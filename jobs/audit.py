"""Ray Job: audit a dataset (run + reduce + HTML report).

    ray job submit --working-dir . -- python jobs/audit.py --config jobs/configs/audit.yaml
"""
from __future__ import annotations

import sys

from common import job_parser, load_config, pop_job_settings, run_config

OPTIONS = {"input": "images to analyse (folder, manifest, Parquet or WebDataset)", "output": "the run directory",
           "weights": "model weights: a state dict path, imagenet or demo", "address": "Ray address"}


def main(argv=None) -> int:
    args = job_parser(__doc__.splitlines()[0], OPTIONS).parse_args(argv)
    config = load_config(args, OPTIONS)
    address, report, pictures = pop_job_settings(config, address=None, report=True, pictures=True)
    run = run_config(config)

    from lrpscale.console import configure_logging
    from lrpscale.report.class_pictures import reduce_with_pictures
    from lrpscale.run.audit import run_audit

    configure_logging()
    summary = run_audit(run, address=address)
    print(f"run {summary.run_id}: {summary.ok} images, {summary.errors} errors, {summary.output}")
    if summary.ok:
        print(f"classes: {reduce_with_pictures(summary.output, pictures)}")
        if report:
            from lrpscale.report.page import write_report

            print(f"report: {write_report(summary.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
