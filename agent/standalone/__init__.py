"""`dynoagent up`: a Procfile app on one machine, with a local round-robin router."""
