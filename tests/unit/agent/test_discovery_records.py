"""The names of a space's DNS zone as a pure function of its members (issue 16)."""

from __future__ import annotations

from ipaddress import IPv4Address

from agent.discovery import Member, dns_names, records

A, B, C, D = (IPv4Address(f"10.64.1.{n}") for n in (2, 3, 10, 20))


def test_formation_dyno_and_app_names_of_up_members_sorted() -> None:
    table = records([
        Member("alpha", "web.2", C, "up"),
        Member("alpha", "web.1", B, "up"),
        Member("alpha", "worker.1", A, "up"),
    ])
    assert table == {
        "alpha.app.localspace": (A, B, C),
        "web.alpha.app.localspace": (B, C),
        "1.web.alpha.app.localspace": (B,),
        "2.web.alpha.app.localspace": (C,),
        "worker.alpha.app.localspace": (A,),
        "1.worker.alpha.app.localspace": (A,),
    }


def test_only_up_members_are_named() -> None:
    table = records([
        Member("alpha", "web.1", A, "up"),
        Member("alpha", "web.2", B, "starting"),
        Member("alpha", "web.3", C, "crashed"),
        Member("alpha", "worker.1", D, "down"),
    ])
    assert table["web.alpha.app.localspace"] == (A,)
    assert "2.web.alpha.app.localspace" not in table
    assert "worker.alpha.app.localspace" not in table
    assert table["alpha.app.localspace"] == (A,)
    assert records([Member("alpha", "web.1", A, "starting")]) == {}


def test_apps_of_one_space_keep_their_own_names() -> None:
    table = records([Member("alpha", "web.1", A, "up"), Member("beta", "web.1", B, "up")])
    assert table["web.alpha.app.localspace"] == (A,)
    assert table["web.beta.app.localspace"] == (B,)


def test_names_are_lowercase_and_bad_names_are_left_out() -> None:
    table = records([
        Member("Alpha", "Web.1", A, "up"),
        Member("alpha", "web", B, "up"),          # no number
        Member("alpha", "web.01", B, "up"),       # not a dyno name
        Member("a.b", "web.1", C, "up"),          # a dot would forge another app's names
    ])
    assert table == {"alpha.app.localspace": (A,), "web.alpha.app.localspace": (A,),
                     "1.web.alpha.app.localspace": (A,)}


def test_addresses_are_sorted_numerically_and_not_repeated() -> None:
    low, high = IPv4Address("10.64.1.9"), IPv4Address("10.64.1.10")
    table = records([Member("a", "web.1", high, "up"), Member("a", "web.2", low, "up"),
                     Member("a", "web.3", low, "up")])
    assert table["web.a.app.localspace"] == (low, high)


def test_dns_names_of_a_dyno() -> None:
    assert dns_names("shop", "web.1") == ("web.shop.app.localspace",
                                          "1.web.shop.app.localspace", "shop.app.localspace")
    assert dns_names("shop", "run.3")[1] == "3.run.shop.app.localspace"
