"""End-to-end cryptography core (sans-I/O): PQXDH, Double Ratchet, Sender Keys, groups."""
