"""Two codes on one world, run in turn on this machine: the only fair comparison here.

This machine's speed drifts by more than most changes are worth (the same world, one code, gave
0.854 to 0.925 of the ceiling within five minutes), so a figure from another day says nothing
about a change. `compare.py` checks out `--base` and `--head` (git revisions of this repository)
into temporary directories, gives both this checkout's benchmark scripts (bench/*.py,
tests/processes.py, tests/chaos/audit.py: the same measurement for both), and runs
`bench/throughput.py --scenario S` for base, then head, `--pairs` times. It prints one line per
run and one per pair, and the JSON of every run (also written to bench/results/):

    .venv/bin/python bench/compare.py --base d6d551c --scenario idle2 --pairs 3

The runs use this checkout's virtualenv (the codes' dependencies must match it) and the
databases and Redis `bench/throughput.py` uses; nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What measures, taken from this checkout for both codes.
_MEASURING = ["bench", "tests/processes.py", "tests/chaos/audit.py"]
_FIELDS = (
    ("fraction_of_ceiling", "of ceiling", "{:.3f}"),
    ("slots_given_up_before_sending", "given up", "{}"),
    ("first_request_after_start_s", "first request s", "{:.2f}"),
    ("worker_cpu_us_per_refid", "worker µs", "{:.1f}"),
    ("postgres_cpu_us_per_refid", "Postgres µs", "{:.1f}"),
    ("max_requests_in_any_1s_window", "most in 1 s", "{}"),
    ("code_160", "Code 160", "{}"),
    ("wrong_rows", "wrong rows", "{}"),
)


def checkout(revision: str, into: Path) -> str:
    """`revision`'s tree in `into`, with this checkout's measuring scripts; its commit id."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", revision],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for name in _MEASURING:
        source, target = ROOT / name, into / name
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("results", "__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return commit


def run(tree: Path, scenario: str) -> dict:
    """One benchmark run of the code in `tree`; its result."""
    results = tree / "bench" / "results"
    before = set(results.glob("throughput-*.json")) if results.exists() else set()
    subprocess.run(
        [sys.executable, "bench/throughput.py", "--scenario", scenario],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (new,) = set(results.glob("throughput-*.json")) - before
    return json.loads(new.read_text())


def line(label: str, result: dict) -> str:
    cells = []
    for key, title, spelling in _FIELDS:
        value = result.get(key)
        cells.append(f"{title} {'-' if value is None else spelling.format(value)}")
    return f"{label:<16} " + ", ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision run first in each pair")
    parser.add_argument("--head", default="HEAD", help="git revision run second (HEAD)")
    parser.add_argument("--scenario", default="one", help="a world of bench/throughput.py")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="compare-") as scratch:
        trees = {}
        for side, revision in (("base", args.base), ("head", args.head)):
            tree = Path(scratch) / side
            tree.mkdir()
            trees[side] = (checkout(revision, tree), tree)
        for pair in range(1, args.pairs + 1):
            fractions = {}
            for side in ("base", "head"):
                commit, tree = trees[side]
                result = run(tree, args.scenario)
                result["commit"] = commit
                runs.append(result)
                fractions[side] = result["fraction_of_ceiling"]
                print(line(f"{pair} {side} {commit}", result), flush=True)
            change = fractions["head"] - fractions["base"]
            print(f"pair {pair}: of ceiling {fractions['base']:.3f} -> {fractions['head']:.3f} "
                  f"({change:+.3f})", flush=True)  # fmt: skip
    print(json.dumps(runs))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"compare-{args.scenario}-{int(time.time())}.json").write_text(
        json.dumps(runs, indent=2)
    )


if __name__ == "__main__":
    main()
