"""Fixtures of the launcher tests (defined in harness.py so tests can import its helpers)."""

from tests.privileged.launcher.harness import cgroups, holder, make_dyno

__all__ = ["cgroups", "holder", "make_dyno"]
