"""The operator API on the local Unix socket, and `dynoctl run`/`exec` sessions relayed to the
caller.
"""
