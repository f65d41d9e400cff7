"""SecureChat client SDK: all encryption happens here."""
