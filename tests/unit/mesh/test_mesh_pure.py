"""The mesh's pure parts: the PROXY v2 header against the spec's layout, and config checks."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2porch.node.balance import Strategy
from p2porch.node.mesh import PROXY_V2_SIGNATURE, MeshConfig, MeshRoute, proxy_v2_header

# haproxy proxy-protocol.txt 2.2: the 12-byte signature, spelled out as the spec does.
SPEC_SIGNATURE = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])


def parse(header: bytes) -> tuple[int, int, tuple[str, int], tuple[str, int]]:
    """An independent reading of a v2 header: (ver_cmd, family, src, dst)."""
    assert header[:12] == SPEC_SIGNATURE
    ver_cmd, fam, length = struct.unpack("!BBH", header[12:16])
    body = header[16:]
    assert len(body) == length
    if fam == 0x11:
        src = str(ipaddress.IPv4Address(body[0:4]))
        dst = str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = struct.unpack("!HH", body[8:12])
    else:
        assert fam == 0x21
        src = str(ipaddress.IPv6Address(body[0:16]))
        dst = str(ipaddress.IPv6Address(body[16:32]))
        sport, dport = struct.unpack("!HH", body[32:36])
    return ver_cmd, fam, (src, sport), (dst, dport)


def test_signature_constant_matches_spec():
    assert PROXY_V2_SIGNATURE == SPEC_SIGNATURE


def test_ipv4_exact_bytes():
    header = proxy_v2_header(("10.1.2.3", 51000), ("127.0.0.2", 8080))
    expected = (
        SPEC_SIGNATURE
        + b"\x21"  # version 2, command PROXY
        + b"\x11"  # AF_INET, STREAM
        + b"\x00\x0c"  # 12 address bytes follow
        + bytes([10, 1, 2, 3])
        + bytes([127, 0, 0, 2])
        + (51000).to_bytes(2, "big")
        + (8080).to_bytes(2, "big")
    )
    assert header == expected
    assert len(header) == 28


def test_ipv6_exact_bytes():
    header = proxy_v2_header(("2001:db8::1", 1), ("::1", 65535))
    assert header[:12] == SPEC_SIGNATURE
    assert header[12] == 0x21
    assert header[13] == 0x21  # AF_INET6, STREAM
    assert header[14:16] == b"\x00\x24"  # 36
    assert header[16:32] == ipaddress.IPv6Address("2001:db8::1").packed
    assert header[32:48] == ipaddress.IPv6Address("::1").packed
    assert header[48:52] == b"\x00\x01\xff\xff"
    assert len(header) == 52


def test_ipv4_mapped_addresses_are_sent_as_ipv4():
    # What a dual-stack listener reports for an IPv4 client.
    header = proxy_v2_header(("::ffff:192.0.2.7", 4000), ("::ffff:127.0.0.1", 80))
    assert parse(header) == (0x21, 0x11, ("192.0.2.7", 4000), ("127.0.0.1", 80))


def test_mixed_families_map_ipv4_into_ipv6():
    header = proxy_v2_header(("192.0.2.7", 4000), ("2001:db8::2", 80))
    _, fam, src, dst = parse(header)
    assert fam == 0x21
    assert src == ("::ffff:c000:207", 4000)
    assert dst == ("2001:db8::2", 80)


def test_ipv6_zone_is_dropped():
    header = proxy_v2_header(("fe80::1%eth0", 5), ("fe80::2%eth0", 6))
    assert parse(header)[2:] == (("fe80::1", 5), ("fe80::2", 6))


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (("not-an-ip", 1), ("127.0.0.1", 2)),
        (("127.0.0.1", -1), ("127.0.0.1", 2)),
        (("127.0.0.1", 1), ("127.0.0.1", 65536)),
    ],
)
def test_bad_input_is_refused(src, dst):
    with pytest.raises(ValueError):
        proxy_v2_header(src, dst)


@given(
    st.ip_addresses(v=4),
    st.ip_addresses(v=4),
    st.integers(0, 65535),
    st.integers(0, 65535),
)
def test_ipv4_round_trip(src, dst, sport, dport):
    header = proxy_v2_header((str(src), sport), (str(dst), dport))
    assert parse(header) == (0x21, 0x11, (str(src), sport), (str(dst), dport))


@given(st.ip_addresses(v=6), st.ip_addresses(v=6), st.integers(0, 65535), st.integers(0, 65535))
def test_ipv6_round_trip(src, dst, sport, dport):
    header = proxy_v2_header((str(src), sport), (str(dst), dport))
    if src.ipv4_mapped and dst.ipv4_mapped:
        want = (0x21, 0x11, (str(src.ipv4_mapped), sport), (str(dst.ipv4_mapped), dport))
    else:
        want = (0x21, 0x21, (str(src), sport), (str(dst), dport))
    assert parse(header) == want


# ---- config and routes


def test_defaults_are_valid():
    config = MeshConfig()
    assert config.connect_timeout_s == 2.0
    assert config.max_connect_attempts == 3
    assert config.max_connections == 4096
    assert config.idle_timeout_s == 3600.0
    route = MeshRoute("default", "web", 8080, 80)
    assert route.strategy is Strategy.ROUND_ROBIN
    assert route.proxy_protocol is False
    assert route.prefer_local is True


@pytest.mark.parametrize(
    "kwargs",
    [
        {"connect_timeout_s": 0},
        {"connect_timeout_s": -1},
        {"max_connect_attempts": 0},
        {"idle_timeout_s": 0},
        {"idle_timeout_s": 1.0, "connect_timeout_s": 2.0},
        {"max_connections": 0},
        {"buffer_bytes": 10},
        {"buffer_bytes": 64 << 20},
        {"bind_retry_interval_s": 0},
        {"listen_backlog": 0},
    ],
)
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        MeshConfig(**kwargs)


@pytest.mark.parametrize(("published", "container"), [(0, 80), (8080, 0), (70000, 80), (80, -1)])
def test_route_ports_are_checked(published, container):
    with pytest.raises(ValueError):
        MeshRoute("default", "web", published, container)
