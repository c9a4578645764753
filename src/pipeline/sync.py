"""Log saved run folders to MLflow later, once: `python -m pipeline.sync outputs/runs/DATE/TIME [...]`.

For runs whose tracking store was unreachable, or that were interrupted. Each folder maps to one MLflow
run (found by its `run_folder` tag), so syncing twice adds no second run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.tracking import sync_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="Hydra run folders holding results.json")
    parser.add_argument("--uri", help="tracking URI (default: the one the run noted in tracking.json)")
    parser.add_argument("--experiment", help="experiment name (default: the one the run noted)")
    args = parser.parse_args(argv)
    failed = 0
    for folder in args.folders:
        try:
            run_id, created = sync_folder(folder, args.uri, args.experiment)
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{folder}: {'logged as new' if created else 'updated'} MLflow run {run_id}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
