"""The demo's report of each replica's page."""

from __future__ import annotations

from p2porch.cli.demo import _page_text, _replica_url


def test_page_text_shows_message_and_replica_unescaped() -> None:
    page = '<h1 id="message">Tom &amp; Jerry</h1><p><code id="replica">hello-2</code></p>'
    assert _page_text(page) == "Tom & Jerry (hello-2)"


def test_page_text_falls_back_to_the_raw_start() -> None:
    assert _page_text("  not the demo page  ") == "not the demo page"


def test_replica_url_uses_the_reported_host_port() -> None:
    row = {"publishedPorts": {"8080/tcp": "127.0.0.3:32771"}}
    assert _replica_url(row, "127.0.0.3") == "http://127.0.0.3:32771/"
    assert _replica_url({"publishedPorts": {}}, "127.0.0.3") == ""
