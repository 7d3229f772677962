"""Peak RSS of each phase of one compile: `compile_model` in this process, its RSS sampled every 50 ms by a thread,
and at each progress line the largest RSS since the previous one (so a line's figure is the peak of the phase that
line ends) and the RSS now.

    python bench/phases.py --model /work/scale-cache/qwen2-1.5b-bf16 --recipe recipe.yaml --out /tmp/phases-out

`bench/scale.py` measures whole commands under `/usr/bin/time -v`; this says which phase set the peak.
"""

from __future__ import annotations

import argparse
import resource
import threading
import time

from sparsec.compiler import compile_model
from sparsec.recipe import Recipe


def rss_gib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a checkpoint directory or builtin:NAME")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--out", required=True, help="the compile's output directory")
    args = parser.parse_args()
    peak = {"since": 0.0}

    def sample() -> None:
        while True:
            peak["since"] = max(peak["since"], rss_gib())
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()

    def log(line: str) -> None:
        print(
            f"{time.perf_counter() - start:7.1f}s  peak since last {peak['since']:.2f} GiB  now {rss_gib():.2f}  | {line}",
            flush=True,
        )
        peak["since"] = 0.0

    compile_model(args.model, Recipe.load(args.recipe), args.out, log=log, progress=False)
    log("end")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
