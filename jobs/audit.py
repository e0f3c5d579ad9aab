"""Ray Job: audit a dataset (run + reduce + HTML report).

    ray job submit --working-dir . -- python jobs/audit.py --config jobs/configs/audit.yaml
"""
from __future__ import annotations

import sys

from common import job_parser, load_config, pop_job_settings

OPTIONS = {"input": "images to analyse (folder, manifest, Parquet or WebDataset)", "output": "the run directory",
           "weights": "model weights: a state dict path, imagenet or demo", "address": "Ray address"}


def main(argv=None) -> int:
    args = job_parser(__doc__.splitlines()[0], OPTIONS).parse_args(argv)
    config = load_config(args, OPTIONS)
    address, report, pictures = pop_job_settings(config, address=None, report=True, pictures=True)

    from lrpscale.pipeline import RunConfig, run_audit
    from lrpscale.reduce import reduce_run

    summary = run_audit(RunConfig.from_mapping(config), address=address)
    print(f"run {summary.run_id}: {summary.ok} images, {summary.errors} errors, {summary.output}")
    if summary.ok:
        print(f"classes: {reduce_run(summary.output, pictures=pictures)}")
        if report:
            from lrpscale.report import write_report

            print(f"report: {write_report(summary.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
