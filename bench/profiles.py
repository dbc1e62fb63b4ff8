"""Summarize py-spy profiles (collapsed stacks, ``py-spy record --format raw``).

``bench/throughput.py --profile DIR`` writes one file per process (``server.txt``,
``agent.txt``). For each file this prints where the samples are: by thread, then the
frames with the most samples of their own (self) and in total (inclusive, a frame
counted once per sample however deep it recurs). Line numbers are dropped, so a
function's samples add up.

Example: ``python bench/profiles.py /tmp/prof/server.txt --top 25``.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def _frame(text: str) -> str:
    return _LINE.sub(")", text)


def summarize(path: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        # py-spy --threads puts "process ..." then "thread (ID): NAME" first.
        thread = next((f for f in frames if f.startswith("thread (")), "thread ?")
        threads[re.sub(r"\(\d+\)", "", thread)] += n
        own[frames[-1]] += n
        for f in set(frames):
            if not f.startswith(("process ", "thread (")):
                inclusive[f] += n
    if not total:
        return f"{path}: no samples"
    out = [f"== {path} ({total} samples)", "-- threads"]
    out += [f"{100 * c / total:5.1f}%  {t}" for t, c in threads.most_common()]
    out.append("-- self")
    out += [f"{100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    out.append("-- inclusive")
    out += [f"{100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="collapsed-stack files")
    parser.add_argument("--top", type=int, default=25, help="frames listed per section")
    opts = parser.parse_args()
    for path in opts.files:
        print(summarize(path, opts.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
