"""One "agent run" for the IPAM restart test: a fresh process that opens the state dir,
attaches namespaces and prints what it saw as JSON. `python ipam_phase.py SPEC_JSON`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from netns import HostNetwork, HostNetworkConfig
from netns.namespace import netlink_socket_in
from netns.netlink import Rtnl


def main(spec_text: str) -> int:
    spec = json.loads(spec_text)
    config = HostNetworkConfig(state_dir=Path(spec["state_dir"]), link_prefix="dt",
                               table="dt_agent", host_netns=Path(spec["host_netns"]))
    result: dict[str, object] = {}
    with HostNetwork(config) as net:
        attached = {n: str(net.attach(spec["space"], n).address) for n in spec["reattach"]}
        attached |= {n: str(net.create_attached(spec["space"], n).address)
                     for n in spec["create"]}
        for name in spec["destroy"]:
            net.destroy(spec["space"], name)
            attached.pop(name, None)
        # What the kernel holds, read back through each namespace's own netlink socket.
        kernel = {}
        for name in attached:
            with Rtnl(netlink_socket_in(net.namespace_path(name))) as inner:
                link = inner.link("eth0")
                assert link is not None, name
                kernel[name] = [str(a) for a in inner.addresses(link.index, "eth0")]
        result = {"attached": attached, "kernel": kernel}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
