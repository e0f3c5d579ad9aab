"""Ray Job: scheduled re-analysis. New images -> analysed into the latest matching run; a new
model or config -> a new run side by side, compared with the previous one.

    ray job submit --working-dir . -- python jobs/reanalyze.py --config jobs/configs/reanalyze.yaml
"""
from __future__ import annotations

import sys

from common import job_parser, load_config, pop_job_settings, run_config

OPTIONS = {"input": "images to analyse", "output_root": "the folder holding the runs side by side",
           "weights": "model weights: a state dict path, imagenet or demo", "address": "Ray address"}


def main(argv=None) -> int:
    args = job_parser(__doc__.splitlines()[0], OPTIONS).parse_args(argv)
    config = load_config(args, OPTIONS)
    root, address, report, pictures = pop_job_settings(config, output_root=None, address=None, report=True,
                                                       pictures=True)
    if not root:
        sys.exit("reanalyze needs output_root (in the config or --output-root)")

    config.setdefault("output", root)  # RunConfig requires it; reanalyze picks ROOT/<run id>
    run = run_config(config)

    from lrpscale.console import configure_logging
    from lrpscale.report.class_pictures import write_class_pictures
    from lrpscale.run.reanalysis import reanalyze

    configure_logging()
    result = reanalyze(run, root, address=address)
    if pictures and result.reduced:
        write_class_pictures(result.run)
    print(f"{result.action}: run {result.run} ({result.summary.analysed_now} inputs analysed now, "
          f"{result.summary.ok} images, {result.summary.errors} errors)")
    if result.comparison_dir:
        print(f"comparison with {result.previous}: {result.comparison_dir}")
    if report and result.action != "unchanged":
        from lrpscale.report.page import write_report

        print(f"report: {write_report(result.run, compare=result.previous)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
