"""Trainer benchmarks on CPU, the same as ``cgrpo bench``: ``python benchmarks/trainer_bench.py [--quick]``.

Writes benchmarks/results/*.json (bench, trainer_overhead, sars_tdw_overhead, rollout_throughput, scaling;
committed) and benchmarks/results/scaling.png (git-ignored). What each figure means: :mod:`cgrpo.bench`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cgrpo.bench import run_benchmarks

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and points (about 4 min)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier)")
    args = parser.parse_args()
    print(json.dumps(run_benchmarks(quick=args.quick, out_dir=args.out_dir, threads=args.threads), indent=1))


if __name__ == "__main__":
    main()
