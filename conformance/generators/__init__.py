"""Vector generators: one module per construction, each exposing ``generate() -> dict[name, data]``.

Run ``python -m conformance.generators`` to regenerate every file; the output is
deterministic (fixed keys, fixed randomness), so a regeneration that changes a
file is a change of behaviour and shows in review.
"""
