"""Log drains (DESIGN §5 `log_drains`, §6): every line of an app sent on to syslog (RFC 5424
over TCP or TLS, RFC 6587 octet counting) or HTTPS (logplex framing) receivers, each through
its own bounded, persisted buffer, so that a slow or absent receiver never holds anything up.
"""
