"""Score several policies on the same validation tasks, with paired differences to the first.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/compare_policies.py --root DIR \\
        --policy sft=DIR/sft/adapter --policy sft+rl=DIR/sft/adapter,DIR/rl/adapter \\
        [--datasets ml-1m amazon-cds] [--n-tasks 50] [--max-turns 4] [--max-tool-calls 4] \\
        [--max-new-tokens 192] [--batch-size 16] [--answer-mode generate] [--teacher] \\
        [--reordered KEY] [--json-out FILE]

Each policy is the base model under ``--root`` (``assets/base_model``) with its adapters merged
in order (none: ``--policy base=``). All run the real agent loop and tools on the same
validation slice (``--n-tasks`` valid tasks per dataset, group-balanced; never eval tasks).
Prints the validation table (own answers, valid tool calls, NDCG, tool calls per task) and,
for every policy after the first, the paired NDCG@10 and tool-call differences against the
first with 95% bootstrap intervals. ``--teacher`` adds the scripted teacher on the same tasks
(with the teacher's own budgets: 6 turns, 8 tool calls), the bar an SFT agent is held to.

``--reordered KEY`` scores every policy a second time, as ``NAME@KEY``, on the same tasks with
each task's candidates in another order drawn from KEY (so each item stands elsewhere, under
another label), and prints how alike each policy ranks the items in the two orders: a policy
that ranks by what the items are agrees with itself; one that favours positions or labels does not
(with ``--teacher``, the teacher too: its tools break ties by candidate order).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from recthinker_dagster.artifacts import ArtifactLayout
from recthinker_dagster.settings import ValidationSettings
from recthinker_dagster.stages.validation import validate_policies, validation_suites, validation_table
from recthinker_dagster.training.validation import paired_difference, ranking_agreement, teacher_report


def parse_policy(text: str) -> tuple[str, list[Path]]:
    name, sep, adapters = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--policy takes NAME=ADAPTER[,ADAPTER...], got {text!r}")
    return name, [Path(a) for a in adapters.split(",") if a]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--policy", type=parse_policy, action="append", required=True)
    parser.add_argument("--datasets", nargs="+", default=["ml-1m", "amazon-cds"])
    parser.add_argument("--n-tasks", type=int, default=50, help="validation tasks per dataset")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-tool-calls", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--answer-mode", default="generate", choices=["generate", "logits"])
    parser.add_argument("--teacher", action="store_true", help="also score the scripted teacher on the same tasks")
    parser.add_argument("--reordered", metavar="KEY",
                        help="also score every policy with the candidates in an order drawn from KEY")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    layout = ArtifactLayout(args.root.resolve())
    settings = ValidationSettings(n_tasks=args.n_tasks, max_turns=args.max_turns, max_tool_calls=args.max_tool_calls,
                                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                  answer_mode=args.answer_mode)
    policies = dict(args.policy)
    def log(line: str) -> None:
        print(line, flush=True)

    suites = validation_suites(layout, args.datasets, settings)  # tasks and tool indexes, loaded once
    reports = validate_policies(layout, args.datasets, settings, layout.asset_dir("base_model"), policies, log=log,
                                suites=suites)
    if args.teacher:
        reports["teacher"] = teacher_report(suites, progress=log)
    if args.reordered is not None:
        shuffled = replace(settings, candidate_order=args.reordered)
        reordered_suites = validation_suites(layout, args.datasets, shuffled)
        again = validate_policies(layout, args.datasets, shuffled, layout.asset_dir("base_model"), policies, log=log,
                                  suites=reordered_suites)
        if args.teacher:
            again["teacher"] = teacher_report(reordered_suites, progress=log)
        reports.update({f"{name}@{args.reordered}": report for name, report in again.items()})
    print(validation_table(reports))
    first = next(iter(reports))
    differences = {name: {"ndcg@10": paired_difference(report, reports[first]),
                          "tool_calls": paired_difference(report, reports[first], "tool_calls")}
                   for name, report in reports.items() if name != first}
    for name, diff in differences.items():
        print(f"{name} minus {first}: NDCG@10 {diff['ndcg@10']}, tool calls {diff['tool_calls']}")
    agreement = {name: ranking_agreement(reports[f"{name}@{args.reordered}"], reports[name])
                 for name in reports if f"{name}@{args.reordered}" in reports}
    for name, figures in agreement.items():
        print(f"{name} in two candidate orders: {figures}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"settings": vars(settings), "reports": reports,
                                             "differences_to_first": differences,
                                             "agreement_across_orders": agreement}, indent=2, default=str))


if __name__ == "__main__":
    main()
