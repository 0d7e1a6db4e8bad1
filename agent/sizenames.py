"""How sizes are spelled to people, apart from agent.sizes (which brings dataclasses and
typing): dynoctl prints a one-off's size on the start path of `dynoctl run`."""

from __future__ import annotations

# Display words that Heroku spells in capitals although they contain no digit.
_ACRONYMS = frozenset({"ram"})


def display_name(name: str) -> str:
    """Heroku's spelling of a size name: "standard-1x" -> "Standard-1X", "eco" -> "Eco"."""
    words = []
    for word in name.split("-"):
        if any(c.isdigit() for c in word) or len(word) <= 2 or word in _ACRONYMS:
            words.append(word.upper())
        else:
            words.append(word.capitalize())
    return "-".join(words)
