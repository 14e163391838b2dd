"""Per-example gradient engines vs one plain forward+backward, and end-to-end `run`
throughput, in one run (the code is gradscore/bench.py; `gradscore bench` runs it too).

    python bench/engines.py [--batches 64,256] [--json bench/results/engines_cpu.json --overwrite]

Peers (optional): pip install -c <(pip freeze | grep '^torch==') opacus einops unfoldNd
and pip install --no-deps backpack-for-pytorch (pinning torch so pip never swaps it).
"""
from __future__ import annotations

import sys

from gradscore.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
