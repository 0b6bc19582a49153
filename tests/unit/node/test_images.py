"""Image contexts without the engine: static-binary check, hashing, tar layout, the demo CGI."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from p2porch.node import images
from p2porch.node.errors import ImageBuildError

DEMO = images.DEMO_DIR
needs_busybox = pytest.mark.skipif(
    not any(Path(p).exists() for p in images.BUSYBOX_CANDIDATES),
    reason="busybox-static not installed",
)


def members(context: images.BuildContext) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(context.tar_bytes())) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_static_elf_detection() -> None:
    assert not images.is_static_elf(b"")
    assert not images.is_static_elf(b"#!/bin/sh\necho hi\n")
    dynamic = Path("/bin/ls").read_bytes() if Path("/bin/ls").exists() else b""
    if dynamic:
        assert not images.is_static_elf(dynamic)


@needs_busybox
def test_busybox_context() -> None:
    binary = images.find_busybox()
    assert images.is_static_elf(binary.read_bytes())
    context = images.busybox_context(binary)
    tar = members(context)
    assert tar["rootfs/bin/busybox"].mode == 0o755
    assert tar["rootfs/bin/sh"].issym() and tar["rootfs/bin/sh"].linkname == "busybox"
    for applet in ("httpd", "sleep", "nc", "sed", "hostname"):
        assert f"rootfs/bin/{applet}" in tar
    assert tar["rootfs/tmp"].isdir() and tar["rootfs/tmp"].mode == 0o1777
    assert "Dockerfile" in tar and context.dockerfile.startswith("#")
    assert "FROM scratch" in context.dockerfile


def test_content_hash_is_stable_and_sensitive() -> None:
    entry = images.ContextEntry("a", 0o644, b"x")
    one = images.BuildContext("FROM scratch\n", (entry, images.ContextEntry("b", 0o755, b"y")))
    two = images.BuildContext("FROM scratch\n", (images.ContextEntry("b", 0o755, b"y"), entry))
    assert one.content_hash() == two.content_hash()
    assert one.tar_bytes() == two.tar_bytes()  # deterministic: fixed order and mtimes
    changed = images.BuildContext("FROM scratch\n", (images.ContextEntry("a", 0o644, b"z"),))
    assert changed.content_hash() != images.BuildContext("FROM scratch\n", (entry,)).content_hash()
    mode = images.BuildContext("FROM scratch\n", (images.ContextEntry("a", 0o755, b"x"),))
    assert mode.content_hash() != images.BuildContext("FROM scratch\n", (entry,)).content_hash()
    based = images.BuildContext("FROM x\n", (entry,), base_content="1")
    assert based.content_hash() != images.BuildContext("FROM x\n", (entry,), "2").content_hash()


def test_demo_context_holds_the_app() -> None:
    context = images.demo_context("base")
    tar = members(context)
    assert tar["www/cgi-bin/index.cgi"].mode == 0o755
    assert tar["start.sh"].mode == 0o755
    assert "www/healthz" in tar
    assert (
        context.dockerfile.startswith("#") and f"FROM {images.BUSYBOX_IMAGE}" in context.dockerfile
    )


def test_demo_context_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError):
        images.demo_context("base", tmp_path / "nope")


@needs_busybox
def test_demo_page_escapes_and_names_the_replica() -> None:
    busybox = str(images.find_busybox())
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "MESSAGE": "Hi <there> & co",
        "P2PORCH_REPLICA": "hello-2",
    }
    out = subprocess.run(
        [busybox, "sh", str(DEMO / "www" / "cgi-bin" / "index.cgi")],
        env=env,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    head, _, body = out.partition("\r\n\r\n")
    assert "Content-Type: text/html" in head
    assert "Hi &lt;there&gt; &amp; co" in body
    assert '<code id="replica">hello-2</code>' in body
