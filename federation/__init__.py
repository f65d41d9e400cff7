"""SecureChat protocol layer: codec, signatures, key objects, addresses, frames, transports.

Imports nothing from ``homeserver`` or ``clientsdk``.
"""
