"""The packages type-check under the strict mypy settings of pyproject.toml (a typing regression fails CI)."""

from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["federation", "homeserver", "clientsdk", "conformance"]


@pytest.mark.slow
def test_packages_pass_strict_mypy() -> None:
    out, err, status = mypy_api.run(["--config-file", str(REPO / "pyproject.toml"),
                                     "--cache-dir", str(REPO / ".mypy_cache"),
                                     *[str(REPO / p) for p in PACKAGES]])
    assert status == 0, (out + err)[-4000:]
