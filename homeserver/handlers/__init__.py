"""Request handlers, one module per feature; each receives its repositories through its constructor."""
