"""The `dynoagent serve` process: ordered start-up and shutdown, systemd notification."""
