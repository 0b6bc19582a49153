"""App revisions and rollouts as people read them: what changed, how far an update has got.

The replicated state (node/state.py) keeps each app's revisions -- the templates its
containers ran -- and its latest rollout; the leader's controller (node/rollout.py) drives
the rollout. This module is the pure part of the API on top of them, kept out of the trio
shell (node/api.py) so it can be tested on plain values:

- :func:`describe_change` writes the ``cause`` a revision is recorded with ("image
  p2porch/demo:1 -> :2; env MESSAGE changed"), so ``rollout history`` says why each
  revision exists without anyone having to annotate it;
- :func:`rollout_json` and :func:`revision_json` are the bodies of ``GET .../rollout`` and
  ``GET .../revisions`` (docs/api.md);
- :func:`undo_target` and :func:`rolled_back` decide what ``rollout undo`` commits.

No clock, no I/O: the shell passes the wall clock into the commands and the replica
statuses (every node's, as the endpoint table knows them) into :func:`rollout_json`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from p2porch.node.errors import NodeError
from p2porch.node.manifest import to_manifest
from p2porch.node.reconcile_core import ReplicaStatus
from p2porch.node.spec import (
    PROBE_FIELDS,
    App,
    AppSpec,
    EnvVar,
    ObjectMeta,
    PortSpec,
    Probe,
    replica_name,
    with_settings_of,
)
from p2porch.node.state import AppRevision, Placement, Rollout


class RevisionError(NodeError):
    """``rollout undo`` cannot do what was asked (the API answers 404 or 409)."""


class RevisionNotFound(RevisionError):
    """The requested revision is not (or no longer) in the app's history."""


class NothingToUndo(RevisionError):
    """The app has no earlier revision, or already runs the requested one."""


# A cause travels in the log and every snapshot: bounded, whatever the diff.
MAX_CAUSE_CHARS = 240

# Fields that are not part of the template (AppSpec.template() resets them): never a cause.
_NOT_TEMPLATE = frozenset({"replicas", "update", "ingress", "balance"})
# Manifest spellings (docs/manifests.md) of the template fields, for people.
_MANIFEST_NAMES = {
    "restart_policy": "restartPolicy",
    "stop_grace_s": "stopGracePeriodSeconds",
    "liveness": "livenessProbe",
    "readiness": "readinessProbe",
    "startup": "startupProbe",
}


# --------------------------------------------------------------------------- causes


def _split_image(ref: str) -> tuple[str, str]:
    """``p2porch/demo:2`` -> (``p2porch/demo``, ``:2``); digests keep their ``@``."""
    if "@" in ref:
        repo, _, digest = ref.partition("@")
        return repo, "@" + digest
    colon = ref.rfind(":")
    if colon > ref.rfind("/"):
        return ref[:colon], ref[colon:]
    return ref, ""


def _image_change(old: str, new: str) -> str:
    old_repo, _ = _split_image(old)
    new_repo, new_tag = _split_image(new)
    if old_repo == new_repo and new_tag:
        return f"image {old} -> {new_tag}"
    return f"image {old} -> {new}"


def _names_change(what: str, old: dict[str, object], new: dict[str, object]) -> list[str]:
    """``env A added``, ``env B, C changed``, ``env D removed`` (names in sorted order)."""
    parts = []
    for verb, names in (
        ("added", sorted(set(new) - set(old))),
        ("changed", sorted(n for n in set(old) & set(new) if old[n] != new[n])),
        ("removed", sorted(set(old) - set(new))),
    ):
        if names:
            parts.append(f"{what} {', '.join(names)} {verb}")
    return parts


def _port_key(port: PortSpec) -> str:
    return f"{port.container_port}/{port.protocol.value}"


def _env(spec: AppSpec) -> dict[str, object]:
    return {var.name: var.value for var in spec.env if isinstance(var, EnvVar)}


def _field_change(name: str, old: object, new: object) -> list[str]:
    label = _MANIFEST_NAMES.get(name, name)
    if name == "image":
        return [_image_change(str(old), str(new))]
    if name == "stop_grace_s":
        return [f"{label} {old} -> {new}"]
    if name in PROBE_FIELDS:
        if old is None:
            return [f"{label} added"]
        if new is None:
            return [f"{label} removed"]
        return [f"{label} changed"]
    if name == "ports" and isinstance(old, tuple) and isinstance(new, tuple):
        olds: dict[str, object] = {_port_key(p): p for p in old if isinstance(p, PortSpec)}
        news: dict[str, object] = {_port_key(p): p for p in new if isinstance(p, PortSpec)}
        return _names_change("port", olds, news) or [f"{label} changed"]
    if name == "secrets" and isinstance(old, tuple) and isinstance(new, tuple):
        olds_s: dict[str, object] = {str(s): True for s in old}
        news_s: dict[str, object] = {str(s): True for s in new}
        return _names_change("secret", olds_s, news_s) or [f"{label} reordered"]
    return [f"{label} changed"]


def describe_change(old: AppSpec | None, new: AppSpec) -> str:
    """What changed in the template from ``old`` to ``new``, for the revision's cause.

    ``"created"`` for a new app, ``""`` when only non-template fields changed (replicas, the
    update strategy, ingress, balancing: those start no rollout, so they record no cause).
    """
    if old is None:
        return "created"
    before, after = old.template(), new.template()
    if before == after:
        return ""
    parts: list[str] = []
    for field in attrs.fields(AppSpec):
        if field.name in _NOT_TEMPLATE:
            continue
        was, now = getattr(before, field.name), getattr(after, field.name)
        if was == now:
            continue
        if field.name == "env":
            parts.extend(_names_change("env", _env(before), _env(after)) or ["env reordered"])
        else:
            parts.extend(_field_change(field.name, was, now))
    text = "; ".join(parts)
    if len(text) > MAX_CAUSE_CHARS:
        text = text[: MAX_CAUSE_CHARS - 3].rstrip("; ") + "..."
    return text


# --------------------------------------------------------------------------- revisions


def _probe_word(probe: Probe) -> str:
    action = probe.action
    kind = type(action).__name__.removesuffix("Action").lower()
    return {"httpget": "http", "tcpsocket": "tcp"}.get(kind, kind)


def summarize_template(spec: AppSpec) -> str:
    """One line about what a revision runs: ``p2porch/demo:2; env MESSAGE; ports 8080/tcp``."""
    parts = [spec.image]
    if spec.command or spec.args:
        parts.append(" ".join((*spec.command, *spec.args))[:60])
    if spec.env:
        parts.append("env " + ", ".join(var.name for var in spec.env))
    if spec.ports:
        parts.append("ports " + ", ".join(_port_key(p) for p in spec.ports))
    probes = [f"{name} {_probe_word(probe)}" for name, probe in spec.probes()]
    if probes:
        parts.append("probes " + ", ".join(probes))
    if spec.volumes:
        parts.append(f"{len(spec.volumes)} volume{'s' if len(spec.volumes) != 1 else ''}")
    if spec.secrets:
        parts.append("secrets " + ", ".join(spec.secrets))
    return "; ".join(parts)


def template_manifest(revision: AppRevision) -> dict[str, Any]:
    """The revision's template in manifest spelling (no replicas, update, ingress, balance)."""
    app = App(ObjectMeta(name=revision.app, namespace=revision.namespace), revision.spec)
    spec: dict[str, Any] = to_manifest(app)["spec"]
    for key in ("replicas", "update", "ingress", "loadBalancing"):
        spec.pop(key, None)
    return spec


def revision_json(revision: AppRevision, current: int) -> dict[str, Any]:
    """One entry of ``GET /v1/apps/{ns}/{name}/revisions``."""
    return {
        "revision": revision.revision,
        "cause": revision.cause,
        "createdAt": revision.created_s,
        "current": revision.revision == current,
        "image": revision.spec.image,
        "summary": summarize_template(revision.spec),
        "spec": template_manifest(revision),
    }


def undo_target(history: Sequence[AppRevision], to_revision: int | None) -> AppRevision:
    """The revision ``rollout undo`` goes back to: ``to_revision``, or the one before the
    current (the last in ``history``). Refusals say what the user can do instead."""
    if not history:
        raise NothingToUndo("the app has no revisions yet")
    current = history[-1]
    if to_revision is None:
        if len(history) < 2:
            raise NothingToUndo(
                f"nothing to undo: revision {current.revision} is the only one in the history"
            )
        return history[-2]
    if to_revision == current.revision:
        raise NothingToUndo(f"the app already runs revision {to_revision}")
    for revision in history:
        if revision.revision == to_revision:
            return revision
    known = ", ".join(str(r.revision) for r in history)
    raise RevisionNotFound(
        f"revision {to_revision} not found (the history holds {known}: see rollout history)"
    )


def rolled_back(app: App, revision: AppRevision) -> App:
    """``app`` running ``revision``'s template, keeping its current replicas, update
    strategy, ingress routes and balancing (the parts that are not a revision's).

    Raises :class:`NothingToUndo` when the old template cannot take today's ingress routes
    (a route to a port the old revision does not listen on).
    """
    try:
        spec = with_settings_of(revision.spec, app.spec, drop_unfit_routes=False)
    except ValueError as exc:
        raise NothingToUndo(
            f"revision {revision.revision} cannot take the app's current settings: {exc}"
        ) from None
    return attrs.evolve(app, spec=spec)


# --------------------------------------------------------------------------- rollout status


def _slot_json(
    name: str, slot: int, placement: Placement | None, status: ReplicaStatus | None
) -> dict[str, Any]:
    if placement is None:
        return {
            "slot": slot,
            "replica": replica_name(name, slot),
            "node": None,
            "revision": None,
            "ready": False,
            "state": "pending",
        }
    return {
        "slot": slot,
        "replica": replica_name(name, slot),
        "node": placement.node,
        "revision": placement.generation,
        "ready": status is not None and status.ready,
        "state": status.state.value if status is not None else "pending",
    }


def rollout_json(
    app: App,
    current_revision: int,
    rollout: Rollout | None,
    placements: Iterable[Placement],
    statuses: Iterable[ReplicaStatus],
) -> dict[str, Any]:
    """The body of ``GET /v1/apps/{ns}/{name}/rollout``.

    ``statuses`` are replica statuses as their owners report them (any app's; filtered
    here). A replica counts as ready only when its owner -- the node its placement names --
    says the container of the placement's revision is ready; during a start-first update the
    old container of a slot may still serve (it counts in ``readyTotal``, not in ``ready``).
    A rollout record for another revision than the current one (the template changed while
    the app had no replicas) is stale: the app is then complete at its current revision.
    """
    ns, name = app.meta.namespace, app.meta.name
    record = rollout if rollout is not None and rollout.revision == current_revision else None
    placed = {p.slot: p for p in placements if (p.namespace, p.app) == (ns, name)}
    mine = [s for s in statuses if (s.namespace, s.app) == (ns, name)]
    exact = {(s.slot, s.node, s.generation): s for s in mine}
    ready_any = {(s.slot, s.node) for s in mine if s.ready}
    slots = []
    updated = ready = ready_total = 0
    for slot in range(app.spec.replicas):
        placement = placed.get(slot)
        status = None
        if placement is not None:
            status = exact.get((slot, placement.node, placement.generation))
            if placement.generation == current_revision:
                updated += 1
                ready += status is not None and status.ready
            ready_total += (slot, placement.node) in ready_any
        slots.append(_slot_json(name, slot, placement, status))
    return {
        "namespace": ns,
        "app": name,
        "revision": current_revision,
        "fromRevision": record.from_revision if record else None,
        "state": record.state if record else "complete",
        "paused": record.paused if record else False,
        "message": record.message if record else "",
        "rollbackOf": (record.rollback_of or None) if record else None,
        "startedAt": record.started_s if record else None,
        "updatedAt": record.updated_s if record else None,
        "replicas": app.spec.replicas,
        "updated": updated,
        "ready": ready,
        "readyTotal": ready_total,
        "slots": slots,
    }


__all__ = [
    "NothingToUndo",
    "RevisionError",
    "RevisionNotFound",
    "describe_change",
    "revision_json",
    "rolled_back",
    "rollout_json",
    "summarize_template",
    "template_manifest",
    "undo_target",
]
