"""Fixtures of the holder tests (defined in harness.py so tests can import its helpers)."""

from tests.unit.holder.harness import client, holder, holder_factory, short_dir

__all__ = ["client", "holder", "holder_factory", "short_dir"]
