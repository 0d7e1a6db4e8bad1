"""The two commands: `dynoagent` and `dynoctl`."""
