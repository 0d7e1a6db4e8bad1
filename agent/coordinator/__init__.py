"""The link to the central coordinator (docs/protocol.md)."""
