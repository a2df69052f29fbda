"""Test doubles and shared test data, imported by test modules as ``fakes.<module>`` (tests/ is on sys.path)."""
