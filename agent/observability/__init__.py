"""What the agent tells about dynos: their log lines and tails, metrics."""
