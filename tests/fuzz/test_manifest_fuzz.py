"""Fuzz the manifest parser: mutated valid manifests, random YAML, and YAML bombs.

``parse_manifests`` must return records that survive a dump/parse round trip, or raise
ManifestError whose every problem names the file and the document -- for any input -- and
must stay within bounded memory on inputs built to blow it up (alias bombs, merge-key bombs,
deep nesting, huge flat documents, giant numbers).
"""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Callable

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2porch.node import manifest
from p2porch.node.errors import ManifestError, ManifestProblem
from p2porch.node.manifest import parse_manifests

from .corpus import manifest_seeds
from .targets import ManifestTarget

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
TARGET = ManifestTarget()
APP = "apiVersion: p2porch/v1\nkind: App\nmetadata: {name: web}\nspec:\n  image: busybox\n"


def test_seeds_parse() -> None:
    assert manifest_seeds()
    for text in manifest_seeds():
        assert TARGET.check(text)


@settings(FUZZ, max_examples=200)
@given(seed=st.integers(0, 2**32 - 1))
def test_mutated_manifests(seed: int) -> None:
    rnd = random.Random(seed)
    seeds = TARGET.seeds()
    data = rnd.choice(seeds)
    for _ in range(4):
        data = TARGET.mutate(data, rnd, seeds)
        TARGET.run(data)


yaml_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
yaml_trees = st.recursive(
    yaml_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=10) | st.integers(), children, max_size=4)
    ),
    max_leaves=30,
)
FIELDS = ("image", "ports", "env", "replicas", "resources", "volumes", "placement", "secrets")


@settings(FUZZ, max_examples=120)
@given(spec=st.dictionaries(st.sampled_from(FIELDS), yaml_trees, max_size=5), flow=st.booleans())
def test_random_specs(spec: dict[str, object], flow: bool) -> None:
    doc = {"apiVersion": "p2porch/v1", "kind": "App", "metadata": {"name": "web"}, "spec": spec}
    TARGET.check(yaml.safe_dump(doc, default_flow_style=flow))


@settings(FUZZ, max_examples=150)
@given(text=st.text(alphabet=st.sampled_from("ab:-[]{},&*!|>'\"#\n \t?%@`~0.1"), max_size=120))
def test_random_yaml_text(text: str) -> None:
    TARGET.check(text)


@settings(FUZZ, max_examples=100)
@given(data=st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    TARGET.check(data)


@pytest.mark.parametrize(
    "scalar",
    ['!!int ""', '!!int "-"', "!!float _", '!!bool ""', "!!bool maybe", "!!timestamp x"],
)
def test_explicit_tags_with_malformed_values_are_manifest_errors(scalar: str) -> None:
    """Found by the fuzzer: PyYAML's constructors raised IndexError/KeyError/AttributeError."""
    with pytest.raises(ManifestError) as caught:
        parse_manifests(APP + f"  replicas: {scalar}\n", "m.yaml")
    (problem,) = caught.value.problems
    assert problem.path == "spec.replicas" and problem.line == 6
    assert "cannot read value" in problem.message


# --------------------------------------------------------------------------- bombs


def _peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _problems(text: str) -> tuple[ManifestProblem, ...]:
    with pytest.raises(ManifestError) as caught:
        parse_manifests(text, "bomb.yaml")
    return caught.value.problems


def _laughs(levels: int, shape: str) -> str:
    """Each level refers to the previous one ten times: 10**levels values from ~60*levels bytes."""
    if shape == "list":
        text = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
        for i in range(1, levels):
            text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
        return text
    # Merge keys: PyYAML copies the merged entries into each mapping (flatten_mapping).
    text = "a0: &a0 {" + ", ".join(f"k{j}: x" for j in range(10)) + "}\n"
    for i in range(1, levels):
        text += f"a{i}: &a{i} {{<<: [" + ", ".join([f"*a{i - 1}"] * 10) + "]}\n"
    return text


@pytest.mark.parametrize("shape", ["list", "merge"])
def test_alias_bombs_are_refused_in_bounded_memory(shape: str) -> None:
    text = _laughs(9, shape)  # a billion values
    holder: list[tuple[ManifestProblem, ...]] = []
    peak = _peak(lambda: holder.append(_problems(text)))
    assert any("more than" in p.message for p in holder[0])
    assert peak < 32 * 1024 * 1024


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,  # flow nesting
        "{a: " * 50_000,
        "".join(" " * i + "- \n" for i in range(1, 400)) + "x",  # block nesting
        "a: &x [*x]\n",  # a self-referencing alias: an infinite tree
    ],
    ids=["flow-lists", "flow-maps", "block", "recursive-alias"],
)
def test_deep_nesting_is_refused(text: str) -> None:
    problems = _problems(text)
    assert problems[0].document == 1
    assert "nested" in problems[0].message or "deeper" in problems[0].message


def test_a_huge_flat_document_is_stopped_while_composing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found while fuzzing: the node count was only checked after composing the whole document,
    so 2 MB of ``[1,1,1,...]`` cost 680 MB. It is now checked while composing (bound lowered
    here so the test is small): the problem points at the first node over the bound."""
    monkeypatch.setattr(manifest, "MAX_NODES_PER_DOCUMENT", 1000)
    text = "[" + ",".join(["1"] * 200_000) + "]"
    holder: list[tuple[ManifestProblem, ...]] = []
    peak = _peak(lambda: holder.append(_problems(text)))
    (problem,) = holder[0]
    assert "more than 1000 values" in problem.message
    assert problem.line == 1 and problem.column is not None and problem.column > 1000
    assert peak < 4 * 1024 * 1024  # the text itself is 400 kB; all 200,000 nodes were ~130 MB


def test_a_giant_base60_integer_is_refused_before_construction() -> None:
    """PyYAML reads "1:0:0:..." in quadratic time (400 kB: seconds); it is refused by length."""
    problems = _problems(APP + "  replicas: 1" + ":0" * 200_000 + "\n")
    assert "too long" in problems[0].message and problems[0].path == "spec.replicas"


def test_many_documents_each_bounded() -> None:
    text = ("---\n" + APP) * 300
    problems = _problems(text)  # 300 Apps named web: duplicates, each reported
    assert len(problems) == 299
    assert problems[-1].document == 300
