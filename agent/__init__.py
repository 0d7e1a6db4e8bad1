"""dynoagent: the per-host dyno manager daemon (`dynoagent`) and its operator client (`dynoctl`)."""

from __future__ import annotations

__version__ = "0.1.0"
