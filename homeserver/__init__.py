"""SecureChat homeserver: accounts, devices, keys, ciphertext mailboxes."""
