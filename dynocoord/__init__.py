"""dynocoord: the reference fleet coordinator, whose state lives in etcd (DESIGN §9)."""
