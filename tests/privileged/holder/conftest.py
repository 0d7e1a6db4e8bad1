"""Fixtures of the privileged holder tests: the unit tier's holder harness, reused."""

from tests.unit.holder.harness import short_dir

__all__ = ["short_dir"]
