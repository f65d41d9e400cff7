"""Load and write test-vector files under ``conformance/vectors/<construction>/``.

Paths are built from this file, never from the working directory.  Every file
is a JSON object headed by ``"source"`` (how it was generated) and holding
``"cases"``: a list of objects, each with ``"result": "valid" | "invalid"``.
Bytes are lower-case hex strings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"


def vector_path(construction: str, name: str) -> Path:
    return VECTORS_DIR / construction / f"{name}.json"


def load_vectors(construction: str, name: str) -> dict[str, Any]:
    with vector_path(construction, name).open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def write_vectors(construction: str, name: str, data: dict[str, Any]) -> Path:
    if "source" not in data or "cases" not in data:
        raise ValueError("a vector file needs 'source' and 'cases'")
    path = vector_path(construction, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path
