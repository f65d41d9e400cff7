"""Regenerate every vector file: ``python -m conformance.generators [construction ...]``."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import conformance.generators as package
from conformance.vectorfiles import write_vectors


def main(argv: list[str]) -> int:
    wanted = set(argv)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if wanted and info.name not in wanted:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, data in module.generate().items():
            print(write_vectors(info.name, name, data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
