"""The model zoo shared by tests/ and bench/: small generated models with known traits (needs torch for some)."""
