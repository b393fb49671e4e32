#!/usr/bin/env python
"""How far apart two adapters' weights are: max over tensors of max|a - b| / max|a| (the relative measure the
distributed-training checks use), and whether their configs and keys match.

    python scripts/compare_adapters.py RUN_A RUN_B [--tolerance 1e-5]     # exit 1 when above the tolerance
"""

from __future__ import annotations

import argparse
import sys

from lorakit.io import Adapter


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args(argv)
    a, b = Adapter.read(args.first), Adapter.read(args.second)
    if set(a.tensors) != set(b.tensors):
        print(f"different tensors: {sorted(set(a.tensors) ^ set(b.tensors))[:3]}")
        return 1
    worst, where = 0.0, None
    for key, tensor in a.tensors.items():
        scale = float(tensor.abs().max()) or 1.0
        difference = float((tensor.float() - b.tensors[key].float()).abs().max()) / scale
        if difference >= worst:
            worst, where = difference, key
    print(f"max relative difference {worst:.2e} ({where}); tolerance {args.tolerance:g}: "
          f"{'ok' if worst <= args.tolerance else 'ABOVE'}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
