"""Center: the HTTP API business servers call to push messages and read presence."""
