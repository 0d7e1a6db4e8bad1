"""Helpers shared by the test tiers (test hosts, unique names, polling with deadlines)."""
