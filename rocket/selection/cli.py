"""`rocket select`: choose the experts from a scores file and a bank."""
from __future__ import annotations

from pathlib import Path
from rocket.data.scores import Scores
from rocket.selection.outputs import write_outputs
from rocket.selection.ranking import select_experts
from rocket.errors import SelectionError
from rocket.io import check_paths


def add_arguments(parser) -> None:
    parser.add_argument("--scores", required=True, help="scores JSON written by `rocket score`")
    parser.add_argument("--bank", required=True, help="directory of peft adapters, or a manifest .txt")
    parser.add_argument("--out", required=True,
                        help="experts manifest to write (.txt; rocket train --experts reads it): a # header line, "
                             "then one adapter directory per line")
    parser.add_argument("--n-experts", type=int, default=4, metavar="N", help="experts to choose (N, default: 4)")
    parser.add_argument("--top-m", type=int, default=8, metavar="M", help="prefilter size M by R_P + R_A (default: 8)")
    parser.add_argument("--accuracy-file", metavar="JSON", help="JSON {adapter: accuracy} overriding the scores' accuracy")
    parser.add_argument("--report", help="JSON report (default: the --out path with .json)")
    parser.add_argument("--plot", help="similarity PNG (default: the --out path with .png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    out = Path(args.out)
    report = Path(args.report) if args.report else out.with_suffix(".json")
    plot = None if args.no_plot else (Path(args.plot) if args.plot else out.with_suffix(".png"))
    check_paths({"--scores": args.scores, "--accuracy-file": args.accuracy_file,
                 "--bank": args.bank if Path(args.bank).is_file() else None},
                {"--out": out, "--report": report, "--plot": plot}, SelectionError)
    scores = Scores.load(args.scores)
    selection = select_experts(scores, Path(args.bank), acc=args.accuracy_file, top_m=args.top_m,
                               n_experts=args.n_experts, device=args.device, progress=not args.no_progress)
    write_outputs(selection, out, report, plot)
    print(selection.format_table())
    for note in selection.notes:
        print(f"note: {note}")
    print(f"chosen ({selection.objective[selection.best]} = Σ(R_P+R_A) {selection.rank_sum[selection.best]} "
          f"+ R_D {selection.r_d[selection.best]}): {', '.join(selection.experts)}; wrote {out}, {report}"
          + (f", {plot}" if plot else ""))
    return 0
