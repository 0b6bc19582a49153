"""Errors of the node layer: desired state, manifests, and the container runtime.

Every exception the node raises on purpose derives from :class:`NodeError`, so the daemon can
tell "the user wrote something wrong" (``SpecError``, ``ManifestError``) apart from "the
engine misbehaved" (``RuntimeEngineError`` and children) and react differently: the first is
reported back to the caller once, the second is retried by the reconciler with back-off::

    P2porchError                          (p2porch.common.errors)
    └── NodeError
        ├── SpecError (also ValueError)   a desired-state value breaks a rule; .path says where
        ├── ManifestError                 one or more problems in a manifest file (.problems)
        └── RuntimeEngineError            the container engine refused or failed a request
            ├── EngineUnavailable         the engine does not answer (socket, refused, timeout)
            ├── EngineRefused             the engine answered with an error (bad mount, port taken)
            ├── ImageUnavailable          an image is neither local nor pullable
            ├── ImageBuildError           a local image build failed
            ├── ContainerNotFound         no container with that id (or it was removed)
            ├── ContainerConflict         the name is taken / the state forbids the request
            └── NotOwned                  the container exists but is not this node's

``SpecError`` is also a ``ValueError`` so that attrs validators raising it make
``codec.decode`` report a :class:`~p2porch.common.errors.CodecError`, as every other
constructor refusal does.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from p2porch.common.errors import P2porchError


class NodeError(P2porchError):
    """Root of every node-layer error."""


PathPart = str | int


def format_path(path: Sequence[PathPart]) -> str:
    """Render ``("ports", 1, "container_port")`` as ``ports[1].container_port``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class SpecError(NodeError, ValueError):
    """A desired-state value breaks a rule. ``path`` locates the field inside the record.

    The path uses the Python field names of :mod:`p2porch.node.spec`; the manifest parser
    rewrites it into the manifest's camelCase names so users see the spelling they typed.
    """

    def __init__(self, path: Sequence[PathPart], message: str) -> None:
        self.path: tuple[PathPart, ...] = tuple(path)
        self.message = message
        shown = format_path(self.path)
        super().__init__(f"{shown}: {message}" if shown else message)

    def within(self, *prefix: PathPart) -> SpecError:
        """The same error seen from an enclosing record (its path prefixed)."""
        return SpecError((*prefix, *self.path), self.message)


@attrs.frozen
class ManifestProblem:
    """One problem in a manifest file, located as precisely as the YAML allows.

    ``document`` is 1-based (the first YAML document is 1); ``line``/``column`` are 1-based
    too and ``None`` when the problem concerns the whole file (e.g. it cannot be read).
    """

    filename: str
    document: int | None
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = []
        if self.document is not None:
            where.append(f"document {self.document}")
        if self.line is not None:
            where.append(f"line {self.line}")
            if self.column is not None:
                where.append(f"column {self.column}")
        head = f"{self.filename}: {', '.join(where)}" if where else self.filename
        return f"{head}: {self.path}: {self.message}" if self.path else f"{head}: {self.message}"


class ManifestError(NodeError):
    """Every problem found in one manifest file, collected rather than stopping at the first."""

    def __init__(self, problems: Sequence[ManifestProblem]) -> None:
        self.problems: tuple[ManifestProblem, ...] = tuple(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in manifest"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))


class RuntimeEngineError(NodeError):
    """The container engine refused or failed a request (``__cause__`` holds the SDK error)."""


class EngineUnavailable(RuntimeEngineError):
    """The engine does not answer: socket missing, connection refused, timeout."""


class EngineRefused(RuntimeEngineError):
    """The engine answered with an error: a missing bind path, a port already taken, ...

    ``status`` is the engine's HTTP status (500 for most start failures).
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class ImageUnavailable(RuntimeEngineError):
    """An image is not present locally and cannot be pulled (no registry, unknown ref, auth)."""

    def __init__(self, ref: str, reason: str) -> None:
        self.ref = ref
        self.reason = reason
        super().__init__(f"image {ref!r} is not available locally and cannot be pulled: {reason}")


class ImageBuildError(RuntimeEngineError):
    """A local image build (the registry-free busybox images) failed."""


class ContainerNotFound(RuntimeEngineError):
    """No container with that id or name (possibly removed concurrently)."""


class ContainerConflict(RuntimeEngineError):
    """The engine refused because of a conflict: name in use, or a state that forbids it."""


class NotOwned(RuntimeEngineError):
    """The container exists but does not carry this node's label: never touched."""
