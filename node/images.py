"""Registry-free images: busybox FROM scratch, and the demo app on top of it.

The machines p2porch is tested on reach no registry, so every image the tests and examples
run is built here, locally, from files already on the machine:

* ``p2porch/busybox:latest`` -- ``FROM scratch`` plus Debian's statically linked busybox
  (package busybox-static) and one symlink per applet in /bin, made at build time in the
  context tar (no RUN step, so no build container is started);
* ``p2porch/demo:latest`` -- examples/demo/: busybox httpd serving a CGI page that shows
  ``$MESSAGE`` and the replica's name (``$P2PORCH_REPLICA``, set by the runtime).

Builds go through the docker SDK with an in-memory tar context, so no Dockerfile tool is
needed. Each image carries a content label (a hash of its context, and of its base's label),
and a build is skipped when an image with that tag and label exists: repeated calls are
cheap, and a changed busybox binary or demo file rebuilds exactly what changed.

Functions here are synchronous and take a ``docker.DockerClient``; from trio, run them
through ``DockerRuntime.run_engine`` (see ``ensure_builtin_images``). ``python3 -m
p2porch.node.images`` (scripts/build-images.sh) builds both.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .errors import EngineUnavailable, ImageBuildError, NodeError

if TYPE_CHECKING:
    from .runtime import DockerRuntime

BUSYBOX_IMAGE = "p2porch/busybox:latest"
DEMO_IMAGE = "p2porch/demo:latest"
CONTENT_LABEL = "io.p2porch.image-content"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
# examples/demo next to this package's folder (node/ -> repository root).
DEMO_DIR = Path(__file__).resolve().parent.parent / "examples" / "demo"

_PT_INTERP = 3


@attrs.frozen
class ContextEntry:
    """One entry of a build context: a file (``data``) or a symlink (``link_target``)."""

    path: str
    mode: int = 0o644
    data: bytes = b""
    link_target: str | None = None
    is_dir: bool = False


@attrs.frozen
class BuildContext:
    """An in-memory build context: the Dockerfile text and the entries it copies."""

    dockerfile: str
    entries: tuple[ContextEntry, ...]
    base_content: str = ""

    def content_hash(self) -> str:
        """A stable hash of everything that goes into the image (order-independent)."""
        digest = hashlib.sha256()
        digest.update(self.dockerfile.encode())
        digest.update(b"\0base\0" + self.base_content.encode())
        for entry in sorted(self.entries, key=lambda e: e.path):
            digest.update(
                f"\0{entry.path}\0{entry.mode:o}\0{entry.link_target}\0{entry.is_dir}\0".encode()
            )
            digest.update(hashlib.sha256(entry.data).digest())
        return digest.hexdigest()[:32]

    def tar_bytes(self) -> bytes:
        """The context as a deterministic tar (fixed mtimes and owners)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            dockerfile = self.dockerfile.encode()
            _add(tar, ContextEntry("Dockerfile", 0o644, dockerfile))
            for entry in sorted(self.entries, key=lambda e: e.path):
                _add(tar, entry)
        return buf.getvalue()


def _add(tar: tarfile.TarFile, entry: ContextEntry) -> None:
    info = tarfile.TarInfo(entry.path)
    info.mode = entry.mode
    info.mtime = 0
    info.uid = info.gid = 0
    if entry.is_dir:
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif entry.link_target is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = entry.link_target
        tar.addfile(info)
    else:
        info.size = len(entry.data)
        tar.addfile(info, io.BytesIO(entry.data))


# --------------------------------------------------------------------------- busybox


def find_busybox() -> Path:
    """The static busybox binary of this machine (ImageBuildError if none or not static)."""
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file():
            if not is_static_elf(path.read_bytes()):
                raise ImageBuildError(
                    f"{path} is dynamically linked and cannot run FROM scratch: "
                    "install the static one (apt-get install -y busybox-static)"
                )
            return path
    raise ImageBuildError("no busybox binary found: apt-get install -y busybox-static")


def is_static_elf(data: bytes) -> bool:
    """Whether an ELF64 little-endian binary has no program interpreter (PT_INTERP)."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        offset = phoff + i * phentsize
        if offset + 4 > len(data):
            return False
        if struct.unpack_from("<I", data, offset)[0] == _PT_INTERP:
            return False
    return True


def busybox_applets(busybox: Path) -> list[str]:
    """Applet names the binary provides (``busybox --list``), for the /bin symlinks."""
    try:
        out = subprocess.run(
            [str(busybox), "--list"], capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageBuildError(f"cannot list the applets of {busybox}: {exc}") from exc
    names = sorted({line.strip() for line in out.decode().splitlines() if line.strip()})
    return [name for name in names if "/" not in name and name != "busybox"]


_BUSYBOX_DOCKERFILE = """\
# p2porch/busybox: FROM scratch + Debian's static busybox; one symlink per applet in /bin.
FROM scratch
COPY rootfs/ /
ENV PATH=/bin
CMD ["/bin/sh"]
"""

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"


def busybox_context(busybox: Path | None = None) -> BuildContext:
    binary = busybox or find_busybox()
    entries = [
        ContextEntry("rootfs/bin", 0o755, is_dir=True),
        ContextEntry("rootfs/bin/busybox", 0o755, binary.read_bytes()),
        ContextEntry("rootfs/tmp", 0o1777, is_dir=True),
        ContextEntry("rootfs/root", 0o700, is_dir=True),
        ContextEntry("rootfs/etc", 0o755, is_dir=True),
        ContextEntry("rootfs/etc/passwd", 0o644, _PASSWD.encode()),
        ContextEntry("rootfs/etc/group", 0o644, _GROUP.encode()),
    ]
    entries += [
        ContextEntry(f"rootfs/bin/{name}", 0o777, link_target="busybox")
        for name in busybox_applets(binary)
    ]
    return BuildContext(_BUSYBOX_DOCKERFILE, tuple(entries))


def demo_context(base_content: str, demo_dir: Path = DEMO_DIR) -> BuildContext:
    """The demo app's files (examples/demo), with the Dockerfile found there."""
    dockerfile_path = demo_dir / "Dockerfile"
    try:
        dockerfile = dockerfile_path.read_text()
        entries = []
        for root, dirs, files in os.walk(demo_dir):
            dirs.sort()
            for name in sorted(files):
                full = Path(root) / name
                rel = full.relative_to(demo_dir).as_posix()
                if rel == "Dockerfile":
                    continue
                # Scripts must be executable whatever the checkout did with modes.
                executable = rel.endswith((".sh", ".cgi")) or os.access(full, os.X_OK)
                entries.append(ContextEntry(rel, 0o755 if executable else 0o644, full.read_bytes()))
    except OSError as exc:
        raise ImageBuildError(f"cannot read the demo app in {demo_dir}: {exc}") from exc
    return BuildContext(dockerfile, tuple(entries), base_content=base_content)


# --------------------------------------------------------------------------- building


ProgressFn = Callable[[str], None]


def _existing_content(client: Any, tag: str) -> str | None:
    import docker.errors

    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    labels = image.labels or {}
    value = labels.get(CONTENT_LABEL)
    return value if isinstance(value, str) else None


def build_image(
    client: Any, tag: str, context: BuildContext, progress: ProgressFn | None = None
) -> str:
    """Build ``tag`` from ``context`` unless an image with the same content exists.

    Returns the content hash. Raises ImageBuildError / EngineUnavailable.
    """
    import docker.errors
    import requests.exceptions

    content = context.content_hash()
    try:
        if _existing_content(client, tag) == content:
            return content
        if progress is not None:
            progress(f"building {tag}")
        _image, logs = client.images.build(
            fileobj=io.BytesIO(context.tar_bytes()),
            custom_context=True,
            tag=tag,
            labels={CONTENT_LABEL: content},
            rm=True,
            forcerm=True,
            pull=False,
            timeout=600,  # a cold engine on a slow disk; ordinary requests use less
        )
        if progress is not None:
            for chunk in logs:
                line = chunk.get("stream", "").strip() if isinstance(chunk, dict) else ""
                if line:
                    progress(line)
    except docker.errors.BuildError as exc:
        raise ImageBuildError(f"building {tag} failed: {exc.msg}") from exc
    except docker.errors.APIError as exc:
        raise ImageBuildError(f"building {tag} failed: {exc.explanation or exc}") from exc
    except (requests.exceptions.RequestException, docker.errors.DockerException, OSError) as exc:
        raise EngineUnavailable(
            f"the Docker engine did not answer while building {tag}: {exc}"
        ) from exc
    return content


def build_builtin_images(
    client: Any, progress: ProgressFn | None = None, demo_dir: Path = DEMO_DIR
) -> dict[str, str]:
    """Build (or find up to date) the busybox and demo images; tag -> content hash."""
    base = build_image(client, BUSYBOX_IMAGE, busybox_context(), progress)
    demo = build_image(client, DEMO_IMAGE, demo_context(base, demo_dir), progress)
    return {BUSYBOX_IMAGE: base, DEMO_IMAGE: demo}


async def ensure_builtin_images(
    runtime: DockerRuntime, progress: ProgressFn | None = None
) -> dict[str, str]:
    """The trio way to build the images: on the runtime's engine threads."""
    return await runtime.run_engine(lambda client: build_builtin_images(client, progress))


def main(argv: list[str] | None = None) -> int:
    """``python3 -m p2porch.node.images [-q]``: build the registry-free images."""
    import docker

    args = sys.argv[1:] if argv is None else argv
    quiet = "-q" in args
    if shutil.which("busybox") is None and not any(Path(p).exists() for p in BUSYBOX_CANDIDATES):
        print("no busybox: apt-get install -y busybox-static", file=sys.stderr)
        return 1
    try:
        client = docker.from_env(timeout=300)
    except docker.errors.DockerException as exc:
        print(f"cannot reach the Docker engine: {exc}", file=sys.stderr)
        return 1
    try:
        built = build_builtin_images(client, None if quiet else print)
    except NodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    for tag, content in built.items():
        print(f"{tag}  content={content}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
