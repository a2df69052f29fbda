"""Test doubles shared by several test files (imported as ``fakes.*``; tests/conftest.py puts tests/ on the path)."""
