"""Ray Job: the reducer of a finished run (class graphs, summary heatmaps, k curves, pictures).

    ray job submit --working-dir . -- python jobs/reduce.py --config jobs/configs/reduce.yaml
"""
from __future__ import annotations

import sys

from common import job_parser, load_config

OPTIONS = {"run": "the run directory to reduce"}


def main(argv=None) -> int:
    args = job_parser(__doc__.splitlines()[0], OPTIONS).parse_args(argv)
    config = load_config(args, OPTIONS)

    from lrpscale.report.class_pictures import reduce_with_pictures

    run = config.pop("run")
    print(f"classes: {reduce_with_pictures(run, **config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
