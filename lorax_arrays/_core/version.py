"""The library's version (the package `__init__` re-exports it; pyproject.toml
states the same, which `tests/test_packaging.py` checks)."""

__version__ = "0.1.0"
