"""``python -m rtdmd.pipeline where [--run-id ID]``: where a flow run's results are.

Prints the artifact directory, the MLflow UI command (or server URL) with the experiment and
parent run, and the evaluation table of the latest successful ``RtdmdFlow`` run (or ``--run-id``),
read back through the Metaflow client. ``make demo`` calls it after the flow.
"""
from __future__ import annotations

import argparse
import sys

from rtdmd.pipeline.registration import where_to_look


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rtdmd.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("where", help="print where the results of a flow run are")
    w.add_argument("--run-id", default=None, help="Metaflow run id (default: latest successful run)")
    w.add_argument("--flow", default="RtdmdFlow")
    args = ap.parse_args(argv)

    from metaflow import Flow, namespace

    namespace(None)
    try:
        flow = Flow(args.flow)
        run = flow[args.run_id] if args.run_id else flow.latest_successful_run
    except Exception as exc:  # noqa: BLE001 - no run yet / unknown id
        print(f"error: no {args.flow} run found ({exc}); run `python flows/rtdmd_flow.py run` first", file=sys.stderr)
        return 2
    if run is None:
        print(f"error: no successful {args.flow} run yet", file=sys.stderr)
        return 2
    data = run["end"].task.data
    print(f"{args.flow}/{run.id} ({'successful' if run.successful else 'not successful'})")
    print(where_to_look(data.ctx, data.matrix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
