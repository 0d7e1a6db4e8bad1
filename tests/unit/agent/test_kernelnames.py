"""Every name derived from a dyno id fits its kernel limit, for every id the spec allows, and
distinct ids never share a name (DESIGN §4: the id is in every object's name)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.kernelnames import (
    HOSTNAME_MAX,
    NETNS_NAME_MAX,
    PATH_COMPONENT_MAX,
    cgroup_rel,
    hostname,
    netns_name,
    scope_name,
    slice_name,
)
from netns.names import IFNAMSIZ, check_id, veth_alias, veth_name

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-"
# The whole domain, with the long end (where names overflow) drawn as often as the rest.
IDS = st.one_of(st.text(_ALPHABET, min_size=1, max_size=64),
                st.text(_ALPHABET, min_size=56, max_size=64))
APPS = st.from_regex(r"\A[a-z][a-z0-9-]{0,29}\Z")
IFALIAS_MAX = 255  # IFALIASZ less its NUL


@settings(max_examples=2000)
@given(dyno_id=IDS, app=APPS, space=APPS)
def test_every_derived_name_fits_its_limit(dyno_id: str, app: str, space: str) -> None:
    ns = netns_name(dyno_id)
    assert len(ns) <= NETNS_NAME_MAX
    assert check_id("namespace name", ns) == ns  # what the netns library accepts
    assert len(f"/run/netns/{ns}") < 4096 and len(ns) <= PATH_COMPONENT_MAX
    assert len(veth_name("abcde", ns)) <= IFNAMSIZ
    assert len(veth_alias(space, ns)) <= IFALIAS_MAX
    for part in cgroup_rel(app, dyno_id).split("/"):
        assert len(part) <= PATH_COMPONENT_MAX
    assert len(scope_name(dyno_id)) <= PATH_COMPONENT_MAX
    assert len(slice_name(app)) <= PATH_COMPONENT_MAX
    assert len(f"{dyno_id}.json") <= PATH_COMPONENT_MAX  # its record
    assert 1 <= len(hostname(dyno_id)) <= HOSTNAME_MAX <= 64


@given(dyno_id=IDS)
def test_names_carry_the_id(dyno_id: str) -> None:
    ns = netns_name(dyno_id)
    if len(dyno_id) <= NETNS_NAME_MAX - len("dyno-"):
        assert ns == f"dyno-{dyno_id}"  # unchanged: records made before keep matching
    else:
        start, _, digest = ns[len("dyno-"):].partition(".")
        assert dyno_id.startswith(start) and len(start) >= 30 and len(digest) == 20
    assert dyno_id in scope_name(dyno_id)


@settings(max_examples=1000)
@given(a=IDS, b=IDS)
def test_distinct_ids_get_distinct_names(a: str, b: str) -> None:
    if a == b:
        return
    assert netns_name(a) != netns_name(b)
    assert scope_name(a) != scope_name(b)


def test_long_ids_sharing_a_start_stay_distinct() -> None:
    base = "x" * 63
    ids = [base + c for c in "abcdefghijklmnopqrstuvwxyz0123456789-"]
    # An id whose plain name would look like a bounded one cannot exist: '.' is not in ids.
    ids += ["x" * 38 + "-" + "0" * 20, "a" * 59, "a" * 60]
    names = [netns_name(i) for i in ids]
    assert len(set(names)) == len(names)
    assert len({veth_name("dy", n) for n in names}) == len(names)
