"""The contracts between stages: manifest.json, the .pte metadata reader, and the checksums of both."""
