"""The pure DNS core: names, record kinds, negative answers, errors, truncation, bad bytes."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2porch.node.dns import (
    DnsConfig,
    Drop,
    Forward,
    Reply,
    answer,
    encode_response,
    handle_wire,
    relay_response,
    upstream_query,
)
from p2porch.node.endpoints import EndpointTable
from tests.unit.dns.kit import LOCAL, ep, query, table, tcp, udp

CONFIG = DnsConfig()
APPS = frozenset({("default", "web"), ("default", "idle"), ("shop", "cart")})


def ask(
    name: str,
    rdtype: str = "A",
    tbl: EndpointTable | None = None,
    apps: frozenset[tuple[str, str]] = APPS,
    config: DnsConfig = CONFIG,
) -> dns.message.Message:
    response = answer(query(name, rdtype), tbl if tbl is not None else web_table(), apps, config)
    assert response is not None
    return response


def web_table() -> EndpointTable:
    """web: web-0 on node-a (127.0.0.2), web-1 local (127.0.0.3, two ports), web-2 not ready,
    web-3 on node-a again (same host as web-0)."""
    return table(
        ep("web-0", "node-a", tcp(80, "127.0.0.2", 30000), udp(53, "127.0.0.2", 30001)),
        ep("web-1", LOCAL, tcp(80, "127.0.0.3", 31000), tcp(443, "127.0.0.3", 31001)),
        ep("web-2", "node-c", tcp(80, "127.0.0.4", 32000), ready=False),
        ep("web-3", "node-a", tcp(80, "127.0.0.2", 30002)),
    )


def records(response: dns.message.Message, rdtype: str) -> list[str]:
    kind = dns.rdatatype.from_text(rdtype)
    return [rd.to_text() for rrset in response.answer if rrset.rdtype == kind for rd in rrset]


def additional(response: dns.message.Message) -> dict[str, list[str]]:
    return {
        f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)}": [rd.to_text() for rd in rrset]
        for rrset in response.additional
    }


def assert_nodata(response: dns.message.Message) -> None:
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert response.flags & dns.flags.AA
    [soa] = response.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.ttl == CONFIG.negative_ttl_s


def assert_nxdomain(response: dns.message.Message) -> None:
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.answer == []
    assert response.flags & dns.flags.AA
    [soa] = response.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name == dns.name.from_text("p2porch")
    assert soa.ttl == CONFIG.negative_ttl_s
    assert soa[0].minimum == CONFIG.negative_ttl_s


# ---- config


def test_config_defaults_and_normalisation() -> None:
    assert CONFIG.domain == "p2porch"
    assert CONFIG.ttl_s == 2
    assert CONFIG.upstreams == ()
    config = DnsConfig(domain="Cluster.Internal.", upstreams=[["127.0.0.1", 53]])
    assert config.domain == "cluster.internal"
    assert config.upstreams == (("127.0.0.1", 53),)
    assert config.origin == dns.name.from_text("cluster.internal.")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"domain": ""},
        {"domain": "."},
        {"domain": "bad_label.p2porch"},
        {"domain": "-lead.p2porch"},
        {"domain": "a..b"},
        {"domain": "x" * 64},
        {"domain": ".".join(["abcdefghij"] * 20)},
        {"ttl_s": -1},
        {"ttl_s": 1.5},
        {"negative_ttl_s": -1},
        {"negative_ttl_s": 3600},
        {"upstreams": (("dns.example", 53),)},
        {"upstreams": (("127.0.0.1", 0),)},
        {"upstreams": (("127.0.0.1", 53, 1),)},
        {"upstreams": 5},
        {"upstream_timeout_s": 0},
        {"tcp_idle_timeout_s": -1.0},
        {"max_tcp_connections": 0},
        {"max_forwards_in_flight": 0},
        {"max_udp_payload_bytes": 511},
        {"max_udp_payload_bytes": 70000},
    ],
)
def test_config_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DnsConfig(**kwargs)  # type: ignore[arg-type]


# ---- positive answers


def test_app_a_records_are_distinct_hosts_of_ready_replicas_local_first() -> None:
    response = ask("web.default.p2porch")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    # web-1 is local (127.0.0.3) and comes first; web-0 and web-3 share 127.0.0.2;
    # web-2 (127.0.0.4) is not ready.
    assert records(response, "A") == ["127.0.0.3", "127.0.0.2"]
    assert response.answer[0].ttl == CONFIG.ttl_s


def test_ttl_is_configurable() -> None:
    response = ask("web.default.p2porch", config=DnsConfig(ttl_s=0))
    assert response.answer[0].ttl == 0


def test_aaaa_for_ipv6_hosts_and_nodata_for_the_missing_family() -> None:
    tbl = table(
        ep("web-0", LOCAL, tcp(80, "::1", 30000)), ep("web-1", "node-a", tcp(80, "fd00::2", 3))
    )
    assert records(ask("web.default.p2porch", "AAAA", tbl), "AAAA") == ["::1", "fd00::2"]
    assert_nodata(ask("web.default.p2porch", "A", tbl))
    assert records(ask("web-1.web.default.p2porch", "AAAA", tbl), "AAAA") == ["fd00::2"]


def test_hosts_that_are_not_addresses_are_skipped() -> None:
    tbl = table(
        ep("web-0", LOCAL, tcp(80, "node-b.lan", 30000)), ep("web-1", "x", tcp(80, "127.0.0.9", 1))
    )
    assert records(ask("web.default.p2porch", tbl=tbl), "A") == ["127.0.0.9"]


def test_app_srv_one_per_ready_replica_and_tcp_port_local_first() -> None:
    response = ask("web.default.p2porch", "SRV")
    srv = sorted(records(response, "SRV"))
    assert srv == [
        "0 10 31000 web-1.web.default.p2porch.",
        "0 10 31001 web-1.web.default.p2porch.",
        "10 10 30000 web-0.web.default.p2porch.",
        "10 10 30002 web-3.web.default.p2porch.",
    ]  # no UDP port (web-0's 53/udp), no not-ready web-2
    assert additional(response) == {
        "web-1.web.default.p2porch. A": ["127.0.0.3"],
        "web-0.web.default.p2porch. A": ["127.0.0.2"],
        "web-3.web.default.p2porch. A": ["127.0.0.2"],
    }


def test_port_srv_only_that_port() -> None:
    response = ask("_443._tcp.web.default.p2porch", "SRV")
    assert records(response, "SRV") == ["0 10 31001 web-1.web.default.p2porch."]
    assert additional(response) == {"web-1.web.default.p2porch. A": ["127.0.0.3"]}
    response = ask("_80._tcp.web.default.p2porch", "SRV")
    assert sorted(records(response, "SRV")) == [
        "0 10 31000 web-1.web.default.p2porch.",
        "10 10 30000 web-0.web.default.p2porch.",
        "10 10 30002 web-3.web.default.p2porch.",
    ]


def test_udp_port_srv() -> None:
    response = ask("_53._udp.web.default.p2porch", "SRV")
    assert records(response, "SRV") == ["10 10 30001 web-0.web.default.p2porch."]
    assert_nodata(ask("_53._tcp.web.default.p2porch", "SRV"))


def test_port_names_negative_answers() -> None:
    assert_nodata(ask("_8080._tcp.web.default.p2porch", "SRV"))  # no replica has that port
    assert_nodata(ask("_80._tcp.web.default.p2porch", "A"))  # the name exists, not as A
    assert_nodata(ask("_tcp.web.default.p2porch", "SRV"))  # empty non-terminal
    assert_nxdomain(ask("_http._tcp.web.default.p2porch", "SRV"))
    assert_nxdomain(ask("_0._tcp.web.default.p2porch", "SRV"))
    assert_nxdomain(ask("_80._sctp.web.default.p2porch", "SRV"))
    assert_nxdomain(ask("_80._tcp.nope.default.p2porch", "SRV"))


def test_replica_a_record() -> None:
    assert records(ask("web-0.web.default.p2porch"), "A") == ["127.0.0.2"]
    assert records(ask("web-1.web.default.p2porch"), "A") == ["127.0.0.3"]


def test_replica_with_two_endpoints_during_a_rolling_update() -> None:
    tbl = table(
        ep("web-0", LOCAL, tcp(80, "127.0.0.3", 1), revision=1),
        ep("web-0", "node-a", tcp(80, "127.0.0.2", 2), revision=2),
    )
    assert records(ask("web-0.web.default.p2porch", tbl=tbl), "A") == ["127.0.0.3", "127.0.0.2"]


def test_replica_not_ready_or_not_started_is_nodata_unknown_is_nxdomain() -> None:
    assert_nodata(ask("web-2.web.default.p2porch"))  # exists, not ready
    assert_nodata(ask("web-7.web.default.p2porch"))  # a name the app's replicas take
    assert_nxdomain(ask("db-0.web.default.p2porch"))
    assert_nxdomain(ask("web.web.default.p2porch"))
    assert_nxdomain(ask("a.web-0.web.default.p2porch"))  # deeper than any name


def test_case_insensitive_and_owner_case_echoed() -> None:
    response = ask("WeB.DEFAULT.P2Porch.")
    assert records(response, "A") == ["127.0.0.3", "127.0.0.2"]
    assert response.answer[0].name.to_text() == "WeB.DEFAULT.P2Porch."
    response = ask("_80._TCP.Web.Default.p2porch", "SRV")
    assert len(records(response, "SRV")) == 3
    assert records(ask("WEB-0.web.default.p2porch"), "A") == ["127.0.0.2"]


def test_any_returns_addresses_and_srv() -> None:
    response = ask("web.default.p2porch", "ANY")
    assert records(response, "A") == ["127.0.0.3", "127.0.0.2"]
    assert len(records(response, "SRV")) == 4


def test_other_domain() -> None:
    config = DnsConfig(domain="svc.cluster")
    response = ask("web.default.svc.cluster", config=config)
    assert records(response, "A") == ["127.0.0.3", "127.0.0.2"]
    srv = ask("web.default.svc.cluster", "SRV", config=config)
    assert "0 10 31000 web-1.web.default.svc.cluster." in records(srv, "SRV")
    assert ask("web.default.p2porch", config=config).rcode() == dns.rcode.REFUSED


# ---- negative answers


def test_app_without_ready_replicas_is_nodata() -> None:
    assert_nodata(ask("idle.default.p2porch"))  # in the app set, no endpoints
    assert_nodata(ask("idle.default.p2porch", "SRV"))
    assert_nodata(ask("cart.shop.p2porch", "AAAA"))
    tbl = table(ep("web-0", LOCAL, tcp(80, "127.0.0.3", 1), ready=False))
    assert_nodata(ask("web.default.p2porch", tbl=tbl))


def test_endpoints_count_as_an_existing_app_before_the_app_set_knows_it() -> None:
    tbl = table(ep("api-0", LOCAL, tcp(80, "127.0.0.3", 1), app="api"))
    assert records(ask("api.default.p2porch", tbl=tbl, apps=frozenset()), "A") == ["127.0.0.3"]


def test_unknown_names_are_nxdomain_with_soa() -> None:
    assert_nxdomain(ask("nope.default.p2porch"))
    assert_nxdomain(ask("web.other.p2porch"))  # web exists in default, not in other
    assert_nxdomain(ask("other.p2porch"))  # a namespace with no app


def test_namespace_and_apex() -> None:
    assert_nodata(ask("default.p2porch"))
    assert_nodata(ask("shop.p2porch", "SRV"))
    soa = ask("p2porch", "SOA")
    assert records(soa, "SOA")[0].startswith("ns.p2porch. hostmaster.p2porch. ")
    assert_nodata(ask("p2porch", "A"))


def test_soa_serial_follows_the_table_version() -> None:
    tbl = web_table()
    first = ask("nope.default.p2porch", tbl=tbl).authority[0][0].serial
    tbl.drop_node("node-a")
    assert ask("nope.default.p2porch", tbl=tbl).authority[0][0].serial == first + 1


# ---- refusals, errors, forwarding


def test_outside_the_domain_refused_without_upstreams() -> None:
    response = ask("example.com")
    assert response.rcode() == dns.rcode.REFUSED
    assert not response.flags & dns.flags.AA
    assert ask("p2porch.example.com").rcode() == dns.rcode.REFUSED


def test_outside_the_domain_forwarded_with_upstreams() -> None:
    config = DnsConfig(upstreams=(("127.0.0.1", 5353),))
    assert answer(query("example.com"), web_table(), APPS, config) is None
    response = answer(query("web.default.p2porch"), web_table(), APPS, config)
    assert response is not None
    assert response.flags & dns.flags.RA  # recursion is available through the upstreams


def test_other_classes_and_zone_transfers_refused() -> None:
    q = dns.message.make_query("web.default.p2porch", "A", rdclass=dns.rdataclass.CH)
    refused = answer(q, web_table(), APPS, CONFIG)
    assert refused is not None
    assert refused.rcode() == dns.rcode.REFUSED
    assert ask("p2porch", "AXFR").rcode() == dns.rcode.REFUSED


def test_formerr_for_question_counts_other_than_one() -> None:
    empty = query("web.default.p2porch")
    empty.question = []
    two = query("web.default.p2porch")
    two.question.append(
        dns.rrset.RRset(dns.name.from_text("x.p2porch"), dns.rdataclass.IN, dns.rdatatype.A)
    )
    for q in (empty, two):
        response = answer(q, web_table(), APPS, CONFIG)
        assert response is not None
        assert response.rcode() == dns.rcode.FORMERR
        assert response.id == q.id
        assert response.flags & dns.flags.QR


@pytest.mark.parametrize("opcode", [dns.opcode.NOTIFY, dns.opcode.IQUERY, dns.opcode.STATUS])
def test_notimp_for_opcodes_other_than_query(opcode: dns.opcode.Opcode) -> None:
    q = query("web.default.p2porch")
    q.set_opcode(opcode)
    outcome = handle_wire(q.to_wire(), web_table(), APPS, CONFIG, tcp=False)
    assert isinstance(outcome, Reply)
    assert outcome.response.rcode() == dns.rcode.NOTIMP
    assert outcome.response.opcode() == opcode
    assert dns.message.from_wire(outcome.wire).id == q.id


def test_notimp_for_an_update_we_cannot_even_parse() -> None:
    update = dns.update.UpdateMessage("default.p2porch")
    update.add("web", 30, "A", "10.0.0.1")
    outcome = handle_wire(update.to_wire(), web_table(), APPS, CONFIG, tcp=False)
    assert isinstance(outcome, Reply)
    assert outcome.response.rcode() == dns.rcode.NOTIMP
    # An unparseable body under an UPDATE header: the header alone earns NOTIMP.
    q = query("web.default.p2porch")
    q.set_opcode(dns.opcode.UPDATE)
    outcome = handle_wire(q.to_wire(), web_table(), APPS, CONFIG, tcp=False)
    assert isinstance(outcome, Reply)
    reply = dns.message.from_wire(outcome.wire)
    assert reply.rcode() == dns.rcode.NOTIMP
    assert reply.id == q.id
    assert reply.opcode() == dns.opcode.UPDATE


def test_badvers_for_edns_versions_above_zero() -> None:
    response = answer(query("web.default.p2porch", edns=1), web_table(), APPS, CONFIG)
    assert response is not None
    assert response.rcode() == dns.rcode.BADVERS
    assert response.edns == 0


# ---- wire: sizes, truncation, bad bytes


def big_table(replicas: int) -> EndpointTable:
    return table(
        *(ep(f"web-{i}", "node-a", tcp(80, f"127.0.1.{i + 1}", 30000 + i)) for i in range(replicas))
    )


def test_udp_without_edns_truncates_at_512_with_tc() -> None:
    tbl = big_table(60)
    q = query("web.default.p2porch")
    outcome = handle_wire(q.to_wire(), tbl, APPS, CONFIG, tcp=False)
    assert isinstance(outcome, Reply)
    assert outcome.truncated
    assert len(outcome.wire) <= 512
    reply = dns.message.from_wire(outcome.wire, raise_on_truncation=False)
    assert reply.flags & dns.flags.TC
    assert reply.id == q.id


def test_tcp_is_not_truncated() -> None:
    tbl = big_table(60)
    outcome = handle_wire(query("web.default.p2porch").to_wire(), tbl, APPS, CONFIG, tcp=True)
    assert isinstance(outcome, Reply)
    assert not outcome.truncated
    assert len(records(dns.message.from_wire(outcome.wire), "A")) == 60


def test_edns_payload_is_honoured_up_to_our_limit() -> None:
    tbl = big_table(60)  # ~1 KB of A records
    big = handle_wire(
        query("web.default.p2porch", edns=True, payload=4096).to_wire(),
        tbl,
        APPS,
        CONFIG,
        tcp=False,
    )
    assert isinstance(big, Reply)
    assert not big.truncated
    assert 512 < len(big.wire) <= CONFIG.max_udp_payload_bytes
    small = handle_wire(
        query("web.default.p2porch", edns=True, payload=600).to_wire(), tbl, APPS, CONFIG, tcp=False
    )
    assert isinstance(small, Reply)
    assert small.truncated
    assert len(small.wire) <= 600
    tiny = DnsConfig(max_udp_payload_bytes=512)  # our own cap wins over the client's offer
    capped = handle_wire(
        query("web.default.p2porch", edns=True, payload=4096).to_wire(), tbl, APPS, tiny, tcp=False
    )
    assert isinstance(capped, Reply)
    assert capped.truncated
    assert len(capped.wire) <= 512


def test_dropped_additional_records_do_not_set_tc() -> None:
    tbl = big_table(10)  # 10 SRV fit in 512 bytes, their 10 A records do not
    q = query("web.default.p2porch", "SRV")
    response = answer(q, tbl, APPS, CONFIG)
    assert response is not None
    wire, truncated = encode_response(response, q, CONFIG, tcp=False)
    reply = dns.message.from_wire(wire)
    assert not truncated
    assert len(records(reply, "SRV")) == 10
    assert len(reply.additional) < 10


def test_a_good_query_over_the_wire() -> None:
    q = query("web.default.p2porch")
    outcome = handle_wire(q.to_wire(), web_table(), APPS, CONFIG, tcp=False)
    assert isinstance(outcome, Reply)
    reply = dns.message.from_wire(outcome.wire)
    assert reply.id == q.id
    assert q.is_response(reply)
    assert records(reply, "A") == ["127.0.0.3", "127.0.0.2"]


def test_forward_outcome_for_outside_names() -> None:
    config = DnsConfig(upstreams=(("127.0.0.1", 5353),))
    outcome = handle_wire(query("example.com").to_wire(), web_table(), APPS, config, tcp=False)
    assert isinstance(outcome, Forward)
    assert outcome.query.question[0].name == dns.name.from_text("example.com")


def test_upstream_query_and_relay_swap_ids() -> None:
    q = query("example.com", edns=True)
    out = upstream_query(q, 4242)
    assert out.id == 4242
    assert out.question == q.question
    assert out.edns == 0
    upstream_answer = dns.message.make_response(out)
    relayed = relay_response(upstream_answer, q, CONFIG)
    assert relayed.id == q.id
    assert q.is_response(relayed)


GOOD = query("web.default.p2porch").to_wire()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x12\x34" + b"\x00" * 5,  # shorter than a header
        GOOD[:-3],  # question cut short
        GOOD + b"junk",  # trailing bytes
        b"\xff" * 40,
        GOOD[:12] + b"\xc0\x0c" + GOOD[14:],  # a compression pointer looping on itself
    ],
)
def test_malformed_bytes_are_dropped(data: bytes) -> None:
    outcome = handle_wire(data, web_table(), APPS, CONFIG, tcp=False)
    assert isinstance(outcome, Drop)


def test_responses_are_dropped_never_answered() -> None:
    response = dns.message.make_response(query("web.default.p2porch"))
    outcome = handle_wire(response.to_wire(), web_table(), APPS, CONFIG, tcp=False)
    assert isinstance(outcome, Drop)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    outcome = handle_wire(data, web_table(), APPS, CONFIG, tcp=False)
    assert isinstance(outcome, Reply | Forward | Drop)
    if isinstance(outcome, Reply):
        assert len(outcome.wire) <= 512


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), max_size=6))
def test_mutated_queries_never_raise(flips: list[tuple[int, int]]) -> None:
    data = bytearray(GOOD)
    for index, value in flips:
        data[index] = value
    outcome = handle_wire(bytes(data), web_table(), APPS, CONFIG, tcp=False)
    assert isinstance(outcome, Reply | Drop)


def test_remote_addresses_rotate_with_the_query_id_local_first() -> None:
    tbl = table(
        ep("web-0", LOCAL, tcp(80, "127.0.0.3", 30000)),
        ep("web-1", "node-x", tcp(80, "127.0.0.5", 30001)),
        ep("web-2", "node-y", tcp(80, "127.0.0.6", 30002)),
    )
    firsts = set()
    for query_id in range(4):
        q = query("web.default.p2porch")
        q.id = query_id
        response = answer(q, tbl, APPS, CONFIG)
        assert response is not None
        addresses = records(response, "A")
        assert addresses[0] == "127.0.0.3"  # the local node's own replica stays first
        assert sorted(addresses[1:]) == ["127.0.0.5", "127.0.0.6"]
        firsts.add(addresses[1])
    assert firsts == {"127.0.0.5", "127.0.0.6"}  # clients are spread over the remotes
