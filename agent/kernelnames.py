"""Names of the kernel objects and files made for a dyno, derived from its id (DESIGN §4), and
the limits they must fit for every id the spec allows (`[a-z0-9-]{1,64}`, apps and spaces
`[a-z][a-z0-9-]{0,29}`).

Every such name carries the dyno id, so that a restarted agent can find, adopt or sweep the
object. Where `dyno-<id>` would be too long (a network namespace name, for ids of 60 to 64
characters), the name keeps the start of the id and adds a digest of the whole id after a
`.`, a character no dyno id contains: such a name never equals the plain name of another id,
and two bounded names are equal only if 80-bit digests collide. Adoption and the sweeps
match names through the dyno records (a placement records the names it was made with), so
records written before names were bounded keep working as they are.
"""

from __future__ import annotations

import hashlib

# A namespace name is a file name under /run/netns, a marker file, an address-book owner and
# part of the veth's alias; the netns library takes names of at most 64 characters
# (netns.names.check_id).
NETNS_NAME_MAX = 64
# The kernel allows 64 bytes (__NEW_UTS_LEN); a DNS label, 63.
HOSTNAME_MAX = 63
# NAME_MAX: the longest file name (one path component; cgroup directories included).
PATH_COMPONENT_MAX = 255
NETNS_PREFIX = "dyno-"
# Separates the kept start of a long id from the digest; never part of a dyno id.
DIGEST_MARK = "."
_DIGEST_BYTES = 10  # 20 hex characters


def id_digest(dyno_id: str) -> str:
    return hashlib.blake2s(dyno_id.encode(), digest_size=_DIGEST_BYTES).hexdigest()


def netns_name(dyno_id: str) -> str:
    """`dyno-<id>`, or `dyno-<start of id>.<digest of id>` when that would exceed
    NETNS_NAME_MAX."""
    name = f"{NETNS_PREFIX}{dyno_id}"
    if len(name) <= NETNS_NAME_MAX:
        return name
    digest = id_digest(dyno_id)
    keep = NETNS_NAME_MAX - len(NETNS_PREFIX) - len(DIGEST_MARK) - len(digest)
    return f"{NETNS_PREFIX}{dyno_id[:keep]}{DIGEST_MARK}{digest}"


def scope_name(dyno_id: str) -> str:
    """The dyno's cgroup directory (at most 75 characters)."""
    return f"dyno-{dyno_id}.scope"


def slice_name(app: str) -> str:
    """The app's cgroup directory above its dynos' (at most 40 characters)."""
    return f"app-{app}.slice"


def cgroup_rel(app: str, dyno_id: str) -> str:
    return f"{slice_name(app)}/{scope_name(dyno_id)}"


def hostname(dyno_id: str) -> str:
    """The dyno's hostname: its id, cut to a DNS label (the whole id is an /etc/hosts
    alias)."""
    return dyno_id[:HOSTNAME_MAX]
