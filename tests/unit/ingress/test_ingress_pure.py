"""The ingress's pure half: rule choice, request targets, header rewriting, pages, config."""

from __future__ import annotations

import itertools
import math

import pytest

from p2porch.node.balance import Strategy
from p2porch.node.ingress import (
    IngressConfig,
    IngressRule,
    error_page,
    forward_request_headers,
    forward_response_headers,
    header_value,
    is_websocket_upgrade,
    match_rule,
    normalize_host,
    path_matches,
    route_target,
)


def rule(host: str, path: str = "/", app: str = "a", ns: str = "default") -> IngressRule:
    return IngressRule(host=host, path=path, namespace=ns, app=app, container_port=80)


# ---- rules


def test_rule_normalises_host_and_path() -> None:
    r = IngressRule(
        host="Shop.Example.COM.", path="/api/", namespace="n", app="a", container_port=1
    )
    assert r.host == "shop.example.com"
    assert r.path == "/api"
    assert rule("", "/").path == "/"
    assert rule("", "///").path == "/"
    assert r.strategy is Strategy.ROUND_ROBIN


@pytest.mark.parametrize("host", ["*", "*.", "a.*.com", "a b", "a/b", "a:80", "**.x", "[::1]"])
def test_rule_refuses_bad_hosts(host: str) -> None:
    with pytest.raises(ValueError, match="ingress host"):
        rule(host)


@pytest.mark.parametrize("path", ["", "api", "/a?b", "/a#b", "/a b"])
def test_rule_refuses_bad_paths(path: str) -> None:
    with pytest.raises(ValueError, match="ingress path"):
        rule("", path)


def test_rule_refuses_empty_names_and_bad_ports() -> None:
    with pytest.raises(ValueError, match="namespace"):
        IngressRule(host="", namespace="", app="a", container_port=80)
    with pytest.raises(ValueError, match="app"):
        IngressRule(host="", namespace="n", app="", container_port=80)
    for port in (0, 65536, -1):
        with pytest.raises(ValueError, match="container_port"):
            IngressRule(host="", namespace="n", app="a", container_port=port)


# ---- matching


def test_exact_host_beats_wildcard_beats_any() -> None:
    exact, wild, anyhost = (
        rule("shop.example.com", app="exact"),
        rule("*.example.com", app="wild"),
        rule("", app="any"),
    )
    rules = [anyhost, wild, exact]
    assert match_rule(rules, "shop.example.com", "/") is exact
    assert match_rule(rules, "blog.example.com", "/") is wild
    assert match_rule(rules, "example.com", "/") is anyhost  # a wildcard needs one more label
    assert match_rule(rules, "a.b.example.com", "/") is anyhost  # ... exactly one
    assert match_rule(rules, "other.org", "/x") is anyhost
    assert match_rule(rules, "", "/x") is anyhost


def test_host_beats_path_length() -> None:
    """A host-specific rule wins even over a longer path under "any host"."""
    short = rule("shop.example.com", "/", app="short")
    long_any = rule("", "/api/v1", app="long")
    assert match_rule([long_any, short], "shop.example.com", "/api/v1/x") is short


def test_longest_prefix_wins_on_whole_segments() -> None:
    root, api, v1 = (
        rule("", "/", app="root"),
        rule("", "/api", app="api"),
        rule("", "/api/v1", app="v1"),
    )
    rules = [root, v1, api]
    assert match_rule(rules, "h", "/api") is api
    assert match_rule(rules, "h", "/api/") is api
    assert match_rule(rules, "h", "/api/x") is api
    assert match_rule(rules, "h", "/apix") is root
    assert match_rule(rules, "h", "/api/v1") is v1
    assert match_rule(rules, "h", "/api/v10") is api
    assert match_rule(rules, "h", "/") is root
    assert match_rule([api], "h", "/apix") is None
    assert match_rule([api], "h", "/") is None


def test_path_matches_segments() -> None:
    assert path_matches("/", "/anything")
    assert not path_matches("/", "*")
    assert path_matches("/a/b", "/a/b/c")
    assert not path_matches("/a/b", "/a/bc")


def test_host_compared_case_insensitively_and_without_port() -> None:
    r = rule("shop.example.com")
    for header in (
        "SHOP.example.COM",
        "shop.example.com:8080",
        "shop.example.com.",
        " shop.example.com ",
    ):
        assert match_rule([r], header, "/") is r, header
    assert match_rule([r], "shop.example.org", "/") is None
    assert normalize_host("[::1]:8080") == "[::1]"
    assert normalize_host("[::1]") == "[::1]"


def test_ties_are_broken_by_namespace_and_app_whatever_the_order() -> None:
    rules = [
        rule("", "/x", app="b", ns="n1"),
        rule("", "/x", app="a", ns="n2"),
        rule("", "/x", app="c", ns="n1"),
    ]
    for order in itertools.permutations(rules):
        chosen = match_rule(order, "h", "/x/y")
        assert chosen is not None and (chosen.namespace, chosen.app) == ("n1", "b")


def test_no_rules_no_match() -> None:
    assert match_rule([], "h", "/") is None


def test_route_target_forms() -> None:
    assert route_target("h:80", "/a/b?x=/c") == ("h:80", "/a/b")
    assert route_target("h", "http://Other.example:81/p?q") == ("Other.example:81", "/p")
    assert route_target("h", "http://user@other.example") == ("other.example", "/")
    assert route_target("h", "*") == ("h", "*")
    host, path = route_target("h", "http://Other.example:81/p")
    assert normalize_host(host) == "other.example"


# ---- headers


def headers(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in pairs]


def as_dict(hs: list[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in hs:
        out.setdefault(k.decode(), []).append(v.decode())
    return out


def test_request_headers_drop_hop_by_hop_and_add_forwarding() -> None:
    out = as_dict(
        forward_request_headers(
            headers(
                ("Host", "shop.example.com"),
                ("Connection", "keep-alive, X-Secret"),
                ("Keep-Alive", "timeout=5"),
                ("X-Secret", "s"),
                ("TE", "trailers"),
                ("Trailer", "X-T"),
                ("Upgrade", "h2c"),
                ("Proxy-Authorization", "Basic x"),
                ("Proxy", "http://evil"),
                ("Accept", "*/*"),
                ("Cookie", "a=1"),
                ("Expect", "100-continue"),
            ),
            client_ip="192.0.2.7",
        )
    )
    for gone in (
        "connection",
        "keep-alive",
        "x-secret",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy",
        "expect",
    ):
        assert gone not in out, gone
    assert out["host"] == ["shop.example.com"]
    assert out["accept"] == ["*/*"] and out["cookie"] == ["a=1"]
    assert out["x-forwarded-for"] == ["192.0.2.7"]
    assert out["x-forwarded-proto"] == ["http"]
    assert out["x-forwarded-host"] == ["shop.example.com"]
    assert out["forwarded"] == ['for=192.0.2.7;proto=http;host="shop.example.com"']
    assert "content-length" not in out and "transfer-encoding" not in out


def test_x_forwarded_for_and_forwarded_are_appended() -> None:
    out = as_dict(
        forward_request_headers(
            headers(
                ("Host", "h"),
                ("X-Forwarded-For", "10.0.0.1"),
                ("X-Forwarded-For", "10.0.0.2"),
                ("X-Forwarded-Proto", "https"),
                ("Forwarded", "for=10.0.0.1"),
            ),
            client_ip="::1",
        )
    )
    assert out["x-forwarded-for"] == ["10.0.0.1, 10.0.0.2, ::1"]
    assert out["x-forwarded-proto"] == ["http"]
    assert out["forwarded"] == ['for=10.0.0.1, for="[::1]";proto=http;host="h"']


def test_framing_is_rederived_not_copied() -> None:
    chunked = as_dict(
        forward_request_headers(
            headers(("Host", "h"), ("Transfer-Encoding", "chunked")), client_ip="1.2.3.4"
        )
    )
    assert chunked["transfer-encoding"] == ["chunked"]
    # "Connection: content-length" must not strip the body's framing.
    sized = as_dict(
        forward_request_headers(
            headers(
                ("Host", "h"), ("Connection", "content-length, host"), ("Content-Length", "12")
            ),
            client_ip="1.2.3.4",
        )
    )
    assert sized["content-length"] == ["12"]
    assert sized["host"] == ["h"]


def test_missing_host_gets_the_fallback() -> None:
    out = as_dict(forward_request_headers([], client_ip="1.2.3.4", fallback_host="127.0.0.1:80"))
    assert out["host"] == ["127.0.0.1:80"]
    assert "x-forwarded-host" not in out


def test_websocket_keeps_upgrade() -> None:
    hs = headers(
        ("Host", "h"),
        ("Connection", "keep-alive, Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "k"),
    )
    assert is_websocket_upgrade(hs)
    assert not is_websocket_upgrade(headers(("Upgrade", "websocket")))
    assert not is_websocket_upgrade(headers(("Connection", "upgrade"), ("Upgrade", "h2c")))
    out = as_dict(forward_request_headers(hs, client_ip="1.2.3.4", websocket=True))
    assert out["upgrade"] == ["websocket"]
    assert out["connection"] == ["Upgrade"]
    assert out["sec-websocket-key"] == ["k"]


def test_response_headers() -> None:
    out = as_dict(
        forward_response_headers(
            headers(
                ("Content-Type", "text/plain"),
                ("Connection", "close, X-Hop"),
                ("X-Hop", "1"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "5"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
            )
        )
    )
    assert out == {"content-type": ["text/plain"], "set-cookie": ["a=1", "b=2"]}
    switching = as_dict(
        forward_response_headers(
            headers(
                ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", "x")
            ),
            switching=True,
        )
    )
    assert switching == {
        "upgrade": ["websocket"],
        "sec-websocket-accept": ["x"],
        "connection": ["Upgrade"],
    }
    plain = as_dict(forward_response_headers(headers(("Content-Length", "5"), ("Upgrade", "h2c"))))
    assert plain == {"content-length": ["5"]}


def test_header_value_joins() -> None:
    assert header_value(headers(("A", "1"), ("a", "2")), b"a") == b"1, 2"
    assert header_value([], b"a") is None


# ---- pages


def test_error_page_is_short_escaped_html() -> None:
    hs, body = error_page(503, "no ready replica of <ns>/app", retry_after_s=5)
    d = as_dict(hs)
    assert d["server"] == ["p2porch"]
    assert d["retry-after"] == ["5"]
    assert d["content-type"] == ["text/html; charset=utf-8"]
    assert d["content-length"] == [str(len(body))]
    assert b"503 Service Unavailable" in body
    assert b"no ready replica of &lt;ns&gt;/app" in body
    assert len(body) < 1024
    hs, _ = error_page(404, "x", close=True)
    assert as_dict(hs)["connection"] == ["close"]
    assert "retry-after" not in as_dict(hs)


# ---- config


def test_config_defaults_are_valid() -> None:
    cfg = IngressConfig()
    assert cfg.max_connect_attempts == 3
    assert cfg.upstream_keepalive_s < cfg.idle_timeout_s


@pytest.mark.parametrize(
    "kw",
    [
        {"header_timeout_s": 0},
        {"idle_timeout_s": -1},
        {"connect_timeout_s": math.nan},
        {"upstream_timeout_s": 0},
        {"body_timeout_s": 0},
        {"tunnel_idle_timeout_s": 0},
        {"upstream_keepalive_s": -1},
        {"max_connections": 0},
        {"max_header_bytes": 100},
        {"max_connect_attempts": 0},
        {"max_idle_per_replica": -1},
        {"retry_after_s": -1},
        {"connect_timeout_s": 10, "upstream_timeout_s": 5},
        {"upstream_keepalive_s": 80, "idle_timeout_s": 75},
    ],
)
def test_config_refuses(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        IngressConfig(**kw)  # type: ignore[arg-type]


def test_config_allows_no_upstream_reuse() -> None:
    assert IngressConfig(upstream_keepalive_s=0).upstream_keepalive_s == 0
