"""Hypothesis strategies for desired-state records (shared by the spec and manifest tests)."""

from __future__ import annotations

from hypothesis import strategies as st

from p2porch.node.spec import (
    App,
    AppSpec,
    Balance,
    BindMount,
    EnvVar,
    FailureAction,
    IngressRoute,
    ObjectMeta,
    PlacementConstraint,
    PortSpec,
    Resources,
    RestartPolicy,
    RestartPolicyKind,
    UpdateOrder,
    UpdateStrategy,
    VolumeMount,
)

MiB = 1024 * 1024

names = st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
text = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=20)


hosts = st.sampled_from(["", "shop.example.com", "*.example.com", "a-b.c"])
updates = st.builds(
    UpdateStrategy,
    order=st.sampled_from(list(UpdateOrder)),
    max_surge=st.sampled_from(["1", "3", "25%", "100%"]),
    max_unavailable=st.sampled_from(["0", "1", "50%"]),
    min_ready_s=st.integers(0, 3600),
    progress_deadline_s=st.integers(1, 86400),
    failure_action=st.sampled_from(list(FailureAction)),
)


@st.composite
def apps(draw: st.DrawFn) -> App:
    cpu_req = draw(st.integers(0, 4000))
    mem_req = draw(st.integers(0, 2**34))
    ports = draw(st.lists(st.integers(1, 65535), unique=True, max_size=3))
    return App(
        ObjectMeta(
            draw(names), draw(names), labels=draw(st.dictionaries(names, names, max_size=3))
        ),
        AppSpec(
            image=draw(
                st.sampled_from(["busybox", "p2porch/demo:latest", "r.io:5000/x/y@sha256:ab"])
            ),
            command=tuple(draw(st.lists(text, max_size=3))),
            args=tuple(draw(st.lists(text, max_size=3))),
            env=tuple(
                EnvVar(k, v)
                for k, v in draw(
                    st.dictionaries(
                        st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True), text, max_size=3
                    )
                ).items()
            ),
            ports=tuple(
                PortSpec(
                    p,
                    draw(st.none() | st.integers(1, 65535)) if i == 0 else None,
                    proxy_protocol=draw(st.booleans()),
                )
                for i, p in enumerate(ports)
            ),
            replicas=draw(st.integers(0, 50)),
            resources=Resources(
                cpu_req,
                draw(st.none() | st.integers(max(1, cpu_req), 64000)),
                mem_req,
                draw(st.none() | st.integers(max(6 * MiB, mem_req), 2**36)),
            ),
            restart_policy=draw(
                st.sampled_from(
                    [
                        RestartPolicy(),
                        RestartPolicy(RestartPolicyKind.NEVER),
                        RestartPolicy(RestartPolicyKind.ON_FAILURE, 3),
                    ]
                )
            ),
            placement=tuple(
                PlacementConstraint.parse(c)
                for c in draw(
                    st.lists(st.sampled_from(["zone==a", "disk!=hdd", "gpu"]), unique=True)
                )
            ),
            volumes=tuple(
                draw(
                    st.sampled_from(
                        [(), (VolumeMount("data", "/data"),), (BindMount("/srv", "/srv", True),)]
                    )
                )
            ),
            stop_grace_s=draw(st.integers(0, 3600)),
            update=draw(updates),
            ingress=tuple(
                IngressRoute(port=p, host=draw(hosts), path=f"/p{p}")
                for p in draw(st.lists(st.sampled_from(ports), unique=True, max_size=2))
            )
            if ports
            else (),
            balance=draw(st.sampled_from(list(Balance))),
        ),
    )
