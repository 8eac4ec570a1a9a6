"""The best policy per task and budget, and how many cells each policy wins, from `vlcache bench quality` runs.

    python scripts/best_policies.py out/quality/quality.json [more.json ...] [--exclude SPEC ...] [--name SPEC=LABEL]

Runs of one model are merged (a policy in two runs keeps the later run's row); a cell's winners are every policy at
its best accuracy (ties all win). Prints a markdown table (best accuracy, its policy, "(+n)" others tied) and the
win counts, most first; a second model is a second call. `--check REF` also prints, for every policy, its worst
cell against REF (the largest drop below it), and whether needle, where and lookup reach 0.97 at 3% and 0.90 at 1%.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merged(paths: list[str]) -> tuple[list[float], dict[str, dict[str, list[float]]]]:
    budgets, table = None, {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        if budgets is not None and data["budgets"] != budgets:
            raise SystemExit(f"{p}: budgets {data['budgets']} differ from {budgets}")
        budgets = data["budgets"]
        for row in data["accuracy"]:
            table.setdefault(row["task"], {}).update(row["policies"])
    return budgets, table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--exclude", action="append", default=[], help="a policy spec to leave out (repeatable)")
    ap.add_argument("--name", action="append", default=[], help="SPEC=LABEL: a shorter label in the table")
    ap.add_argument("--check", help="a reference policy: worst drop below it, and the 1%%/3%% targets")
    args = ap.parse_args(argv)
    budgets, table = merged(args.runs)
    names = {}
    for item in args.name:
        spec, _, label = item.rpartition("=")
        names[spec] = label
    wins: dict[str, int] = {}
    print("| task | " + " | ".join(f"{100 * b:g}%" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for task, rows in table.items():
        rows = {p: r for p, r in rows.items() if p not in args.exclude}
        cells = []
        for i in range(len(budgets)):
            best = max(r[i] for r in rows.values())
            top = [p for p, r in rows.items() if r[i] == best]
            for p in top:
                wins[p] = wins.get(p, 0) + 1
            tied = f" (+{len(top) - 1})" if len(top) > 1 else ""
            cells.append(f"{best:.2f} {names.get(top[0], top[0])}{tied}")
        print(f"| {task} | " + " | ".join(cells) + " |")
    print()
    total = len(table) * len(budgets)
    for p, n in sorted(wins.items(), key=lambda kv: -kv[1]):
        print(f"{n:>3} of {total}  {names.get(p, p)}")
    if args.check:
        print()
        ref = args.check
        for p in sorted({p for rows in table.values() for p in rows} - set(args.exclude) - {ref}):
            drops = [
                (round(rows[ref][i] - rows[p][i], 4), task, budgets[i])
                for task, rows in table.items()
                if p in rows and ref in rows
                for i in range(len(budgets))
            ]
            worst = max(drops) if drops else None
            met = all(
                table[t][p][budgets.index(b)] >= goal
                for t in ("needle", "where", "lookup")
                for b, goal in ((0.01, 0.90), (0.03, 0.97))
                if t in table and p in table[t] and b in budgets
            )
            where = (
                f"{100 * worst[0]:.1f} points below at {worst[1]} {100 * worst[2]:g}%"
                if worst and worst[0] > 0
                else "never below"
            )
            print(f"{names.get(p, p)}: {where}; 1%/3% targets {'met' if met else 'missed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
