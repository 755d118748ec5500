"""Evaluate trained runs: held-out loss and perplexity, greedy answers against the data's replies, forgetting on
built-in general questions, side-by-side replies of the base, the adapter and each export, and each export's
agreement with the adapter, where it stops and its chat template. Writes eval.json, eval.md and eval.png into each
run folder; several runs are also compared in one table and one plot.

    qmor eval runs/NAME                                 # its validation split (else its training data)
    qmor eval runs/NAME --dataset data/test.jsonl       # another dataset, read as training reads one
    qmor eval runs/NAME --export merged/NAME            # an export beside those the run records
    qmor eval runs/a runs/b --output eval-ab            # two runs compared

Exit status 1 when an export is flagged (it drifts from the adapter, does not stop where it stops, or carries
another chat template); 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qmor.commands import USER_ERRORS, fail

COMPARISON = "eval-comparison"  # the comparison's folder when several runs are given without --output


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/NAME) holding a trained adapter")
    p.add_argument("--dataset", default=None, help="evaluate on this instead of the run's own data: a "
                   ".jsonl/.json/.parquet/.csv file, a datasets folder, a Hub dataset id or a built-in task")
    p.add_argument("--split", default="train", help="the dataset's split, or a slice of it (test[:200])")
    p.add_argument("--subset", default="", help="a Hub dataset's configuration")
    p.add_argument("--columns", default="", help="the dataset's columns mapped onto qmor's fields: "
                   "prompt=question,completion=answer")
    p.add_argument("--format", default="auto", help="record format (auto: detected)")
    p.add_argument("--limit", type=int, default=100, help="examples scored, the first ones (default 100)")
    p.add_argument("--export", action="append", default=[], metavar="FOLDER",
                   help="an export (merged, PEFT or GGUF folder) to compare, beside those the run records; repeatable")
    p.add_argument("--prompts", type=int, default=6, help="side-by-side prompts (default 6)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per side-by-side reply (default 48)")
    p.add_argument("--no-general", action="store_true", help="skip the built-in general questions")
    p.add_argument("--output", default=None, help=f"folder for the comparison of several runs (default {COMPARISON})")
    p.add_argument("--base-model", "--model", dest="base_model", default=None,
                   help="the base model where it is now, if it moved since training (its fingerprint is checked)")
    p.add_argument("--allow-other-base", action="store_true", help="evaluate on a base whose fingerprint differs")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return p.parse_args(argv)


def written(run, r: dict) -> None:
    """Write a run's report as soon as it is ready, and show its figures."""
    from qmor.eval import report  # loaded when the command runs, so --help answers at once

    files = report.write_run(run, r)
    print(f"{run.name}:")
    for line in report.summary(r):
        print(f"  {line}")
    print(f"  report: {', '.join(str(f) for f in files)}", flush=True)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    # loaded when the command runs, so --help and bad options answer at once
    from qmor.errors import QmorError
    from qmor.eval import report
    from qmor.eval.items import DataChoice
    from qmor.eval.runner import EvalOptions, evaluate
    from qmor.training.run_dir import RunDir

    try:
        if args.limit < 1:
            raise QmorError(f"--limit must be at least 1, got {args.limit}")
        data = DataChoice(dataset=args.dataset, split=args.split, subset=args.subset, columns=args.columns,
                          format=args.format, limit=args.limit)
        opts = EvalOptions(data=data, exports=[Path(e) for e in args.export], prompts=args.prompts,
                           max_new_tokens=args.max_new_tokens, general=not args.no_general, device=args.device,
                           base_model=args.base_model, allow_other_base=args.allow_other_base)
        reports = evaluate([RunDir(r) for r in args.runs], opts, done=written)
        if len(reports) > 1:
            folder = report.write_comparison(Path(args.output or COMPARISON), reports)
            print(report.comparison(reports))
            print(f"comparison: {folder}/{report.MARKDOWN}, {folder}/{report.PLOT}")
    except USER_ERRORS as e:
        return fail(e)
    except KeyboardInterrupt:  # Ctrl-C, or the app's Stop: every report is written whole or not at all
        print("stopped; the runs evaluated so far keep their reports, the others have none", file=sys.stderr)
        return 130
    flagged = [e["name"] for r in reports for e in r["exports"] if not e["ok"]]
    if flagged:
        print(f"flagged: {', '.join(flagged)} (see the problems above)", file=sys.stderr)
        return 1
    return 0
