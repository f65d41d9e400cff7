"""Application close codes the homeserver uses beyond the standard WebSocket ones."""

CLOSE_REPLACED = 4000          # the same device connected again; this connection is superseded
CLOSE_REVOKED = 4001           # the device was revoked
