"""A candidate of an election in a process of its own, to be SIGKILLed by a test:
`python candidate.py URL PREFIX ID TTL_S`; prints "leading" once it leads, then waits."""

from __future__ import annotations

import asyncio
import sys

from dynocoord.election import Election
from dynocoord.etcd import EtcdClient


async def main(url: str, prefix: str, candidate: str, ttl_s: int) -> None:
    async with EtcdClient(url) as client:
        election = Election(client, prefix.encode(), candidate, ttl_s=ttl_s)
        term = await election.campaign()
        print("leading", flush=True)
        await term.lost.wait()
        print(f"lost: {term.reason}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
