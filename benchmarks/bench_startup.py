"""Start-up time of the `vlhub` command: `vlhub --help`, `vlhub --version` and `vlhub convert --help`, against an
interpreter that does nothing (`python3 -c pass`, the floor every Python command pays) in the same run.

    python3 benchmarks/bench_startup.py [--runs N] [--vlhub CMD] [--python CMD]

Each command runs N times (default 10) as a fresh process: `vlhub` and `python3` as found on this process's PATH,
or the ones named. (Run through pyenv's `python3` shim, that PATH starts with the interpreter's own bin directory, so
no shim is timed; a user's shell goes through pyenv's shims, which add about 0.1 s to every command alike: pass
`--vlhub ~/.pyenv/shims/vlhub --python ~/.pyenv/shims/python3` to time those.) The rounds are interleaved, so every
command shares the machine's noise. Output goes to /dev/null. Reported: median, min and max wall time, and the ratio of the medians
to the floor's. Target (issue 20): `vlhub --help` and `vlhub --version` within 0.5 s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def _find(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        sys.exit(f"no `{name}` on PATH")
    return found


def _seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="runs of each command (default 10)")
    parser.add_argument("--vlhub", help="the vlhub command to run (default: `vlhub` on PATH)")
    parser.add_argument("--python", help="the interpreter of the floor (default: `python3` on PATH)")
    args = parser.parse_args()
    vlhub, python = args.vlhub or _find("vlhub"), args.python or _find("python3")
    commands = {
        "`python3 -c pass` (floor)": [python, "-c", "pass"],
        "`vlhub --help`": [vlhub, "--help"],
        "`vlhub --version`": [vlhub, "--version"],
        "`vlhub convert --help`": [vlhub, "convert", "--help"],
    }
    for argv in commands.values():  # once each, unmeasured: the files are in the page cache for every run
        _seconds(argv)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, argv in commands.items():
            times[name].append(_seconds(argv))
    floor = statistics.median(next(iter(times.values())))
    print(f"{args.runs} runs of each, interleaved; vlhub = {vlhub}, python3 = {python}\n")
    print("| command | median | min | max | ratio to floor |")
    print("|---|---|---|---|---|")
    for name, each in times.items():
        median = statistics.median(each)
        print(f"| {name} | {median:.3f} s | {min(each):.3f} s | {max(each):.3f} s | {median / floor:.2f}x |")


if __name__ == "__main__":
    main()
