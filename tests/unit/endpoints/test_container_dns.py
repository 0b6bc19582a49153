"""Which resolver containers get: the node's own DNS, only where a container can reach it."""

from __future__ import annotations

from pathlib import Path

from p2porch.node.traffic import _host_resolvers, _reachable_from_containers


def test_only_a_non_loopback_node_address_is_reachable_from_containers() -> None:
    assert _reachable_from_containers("192.168.1.10")
    assert _reachable_from_containers("fd00::10")
    assert not _reachable_from_containers("127.0.0.2")
    assert not _reachable_from_containers("::1")
    assert not _reachable_from_containers("not-an-address")


def test_host_resolvers_skip_loopback_stubs_and_junk(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# comment\n"
        "nameserver 127.0.0.53\n"
        "nameserver 192.0.2.1\n"
        "nameserver fe80::1%eth0\n"
        "nameserver bogus\n"
        "search example.com\n"
        "nameserver 192.0.2.2\n"
        "nameserver 192.0.2.3\n"
        "nameserver 192.0.2.4\n"
    )
    assert _host_resolvers(str(conf)) == (
        ("192.0.2.1", 53),
        ("fe80::1", 53),
        ("192.0.2.2", 53),
    )
    assert _host_resolvers(str(tmp_path / "missing")) == ()
