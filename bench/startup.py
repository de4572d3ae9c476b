"""Process start: wall time of `svcrules --help` against the interpreter's own start.

    python bench/startup.py            # median of 20 fresh processes each
    python bench/startup.py --runs 50

`svcrules --help` loads only the CLI and Typer, not Rich: svcrules writes its help as
plain text (tests/unit/test_startup.py keeps it so). The floor rows say what is not
svcrules': `python -c pass` is the interpreter, `import typer` the CLI library, and a
two-command Typer app's --help adds Rich's help formatting, which svcrules' no longer
uses. bench/run.py includes these rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# A Typer app with one command and rich installed: the least a Typer --help costs.
_TYPER_HELP = (
    "import typer\n"
    "app = typer.Typer(add_completion=False)\n"
    "@app.command()\n"
    "def one() -> None: ...\n"
    "@app.command()\n"
    "def two() -> None: ...\n"
    "app()"
)

COMMANDS: dict[str, list[str]] = {
    "svcrules_help": [PY, "-m", "svcrules", "--help"],
    "python": [PY, "-c", "pass"],
    "import_typer": [PY, "-c", "import typer"],
    "typer_help": [PY, "-c", _TYPER_HELP, "--help"],
}


def median_wall(cmd: list[str], runs: int) -> float:
    """Median wall time of `runs` fresh processes (after one unmeasured warm-up, so
    that every run finds the files in the page cache and the bytecode compiled)."""
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        subprocess.run(
            cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
        )
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def startup(runs: int = 20) -> dict[str, Any]:
    """Median seconds per command, and svcrules --help as a multiple of `python -c pass`."""
    row: dict[str, Any] = {"runs": runs}
    for name, cmd in COMMANDS.items():
        row[f"{name}_s"] = round(median_wall(cmd, runs), 4)
    row["help_vs_python"] = round(row["svcrules_help_s"] / row["python_s"], 1)
    return row


def table(row: dict[str, Any]) -> str:
    return (
        f"== start (median of {row['runs']} processes): svcrules --help "
        f"{row['svcrules_help_s']}s = {row['help_vs_python']}x python -c pass "
        f"({row['python_s']}s); floor: import typer {row['import_typer_s']}s, "
        f"a two-command Typer app's --help {row['typer_help_s']}s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="fresh processes per command")
    ap.add_argument("--json", action="store_true", help="print the row as JSON")
    args = ap.parse_args()
    row = startup(args.runs)
    print(json.dumps(row, indent=2) if args.json else table(row))


if __name__ == "__main__":
    main()
