"""The agent's side of the coordinator protocol (docs/protocol.md): `frames` (envelope, codec,
error codes), `link` (the connection), `requests` (what it answers), `payloads` (what it says)."""
