"""Keyring unit tests: sealing round trips, every way a payload can fail, rotation, files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2porch.gossip.errors import GossipError
from p2porch.gossip.keyring import (
    OVERHEAD_BYTES,
    PURPOSE_TCP,
    PURPOSE_UDP,
    AuthenticationFailed,
    Keyring,
    KeyringError,
    generate_key,
    key_hint,
    load_keyring,
    save_keyring,
)

K1 = bytes(range(16))
K2 = bytes(range(100, 132))
K3 = b"\x07" * 32


def test_round_trip_aes128_and_aes256() -> None:
    for key in (K1, K2):
        ring = Keyring(key)
        sealed = ring.seal(b"hello gossip")
        assert len(sealed) == len(b"hello gossip") + OVERHEAD_BYTES
        assert b"hello gossip" not in sealed
        assert ring.open(sealed) == b"hello gossip"


def test_empty_plaintext_round_trips() -> None:
    ring = Keyring(K1)
    assert ring.open(ring.seal(b"")) == b""


def test_nonces_differ_so_equal_plaintexts_seal_differently() -> None:
    ring = Keyring(K1)
    assert ring.seal(b"same") != ring.seal(b"same")


@given(st.binary(max_size=2000))
def test_round_trip_any_payload(payload: bytes) -> None:
    ring = Keyring(K2, [K1])
    assert ring.open(ring.seal(payload, PURPOSE_TCP), PURPOSE_TCP) == payload


def test_wrong_key_is_refused() -> None:
    sealed = Keyring(K1).seal(b"secret")
    with pytest.raises(AuthenticationFailed):
        Keyring(K2).open(sealed)


def test_wrong_key_with_same_hint_still_refused() -> None:
    # Forge the hint of the receiver's key onto a payload sealed with another key: GCM refuses.
    sealed = bytearray(Keyring(K1).seal(b"secret"))
    sealed[1:5] = key_hint(K2)
    with pytest.raises(AuthenticationFailed):
        Keyring(K2).open(bytes(sealed))


@pytest.mark.parametrize("position", [0, 1, 4, 5, 16, 17, 20, -1])
def test_any_tampered_byte_is_refused(position: int) -> None:
    ring = Keyring(K1)
    sealed = bytearray(ring.seal(b"a payload of some length"))
    sealed[position] ^= 0x01
    with pytest.raises(AuthenticationFailed):
        ring.open(bytes(sealed))


@given(st.data())
def test_every_single_bit_flip_is_refused(data: st.DataObject) -> None:
    ring = Keyring(K1)
    sealed = bytearray(ring.seal(b"payload"))
    index = data.draw(st.integers(0, len(sealed) - 1))
    bit = data.draw(st.integers(0, 7))
    sealed[index] ^= 1 << bit
    with pytest.raises(AuthenticationFailed):
        ring.open(bytes(sealed))


def test_truncated_is_refused_at_every_length() -> None:
    ring = Keyring(K1)
    sealed = ring.seal(b"0123456789")
    for cut in range(len(sealed)):
        with pytest.raises(AuthenticationFailed):
            ring.open(sealed[:cut])


@given(st.binary(max_size=200))
def test_garbage_only_ever_raises_authentication_failed(garbage: bytes) -> None:
    with pytest.raises(AuthenticationFailed):
        Keyring(K1).open(garbage)


def test_purposes_are_not_interchangeable() -> None:
    ring = Keyring(K1)
    with pytest.raises(AuthenticationFailed):
        ring.open(ring.seal(b"x", PURPOSE_UDP), PURPOSE_TCP)
    with pytest.raises(AuthenticationFailed):
        ring.open(ring.seal(b"x", PURPOSE_TCP), PURPOSE_UDP)


def test_authentication_failed_is_a_gossip_error() -> None:
    assert issubclass(AuthenticationFailed, GossipError)
    assert issubclass(KeyringError, GossipError)


def test_rotation_sequence_never_breaks_a_pair() -> None:
    """install -> use -> remove across two nodes, in the worst interleavings."""
    a, b = Keyring(K1), Keyring(K1)

    def talk() -> None:
        assert b.open(a.seal(b"a->b")) == b"a->b"
        assert a.open(b.seal(b"b->a")) == b"b->a"

    talk()
    a.install(K2)
    talk()  # a installed, b not yet: both still write K1
    b.install(K2)
    talk()
    a.use(K2)
    talk()  # a writes K2, b writes K1: both read both
    b.use(K2)
    talk()
    a.remove(K1)
    talk()  # a no longer reads K1 but nobody writes it
    b.remove(K1)
    talk()
    assert a.installed_keys() == (K2,) == b.installed_keys()
    # And K1 is really gone.
    with pytest.raises(AuthenticationFailed):
        a.open(Keyring(K1).seal(b"old"))


def test_secondary_keys_are_tried_after_the_primary() -> None:
    ring = Keyring(K1, [K2, K3])
    assert ring.installed_keys() == (K1, K2, K3)
    for key in (K1, K2, K3):
        assert ring.open(Keyring(key).seal(b"m")) == b"m"


def test_primary_cannot_be_removed() -> None:
    ring = Keyring(K1, [K2])
    with pytest.raises(KeyringError):
        ring.remove(K1)
    ring.use(K2)
    ring.remove(K1)
    assert ring.installed_keys() == (K2,)


def test_use_requires_install_and_remove_requires_presence() -> None:
    ring = Keyring(K1)
    with pytest.raises(KeyringError):
        ring.use(K2)
    with pytest.raises(KeyringError):
        ring.remove(K2)
    assert ring.primary == K1


def test_install_is_idempotent_and_keeps_primary() -> None:
    ring = Keyring(K1)
    ring.install(K2)
    ring.install(K2)
    assert ring.installed_keys() == (K1, K2)
    assert ring.primary == K1


@pytest.mark.parametrize("size", [0, 8, 15, 17, 24, 31, 33, 64])
def test_bad_key_sizes_are_refused(size: int) -> None:
    with pytest.raises(KeyringError):
        Keyring(b"k" * size)
    with pytest.raises(KeyringError):
        generate_key(size)


def test_generate_key_sizes() -> None:
    assert len(generate_key()) == 32
    assert len(generate_key(16)) == 16
    assert generate_key() != generate_key()


def test_repr_shows_no_key_material() -> None:
    ring = Keyring(K2)
    assert K2.hex() not in repr(ring)
    assert key_hint(K2).hex() in repr(ring)


def test_save_and_load_round_trip_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ring = Keyring(K2, [K1, K3])
    ring.use(K3)
    save_keyring(ring, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_keyring(path)
    assert loaded.primary == K3
    assert set(loaded.installed_keys()) == {K1, K2, K3}
    assert loaded.open(ring.seal(b"persisted")) == b"persisted"
    # Overwriting keeps the mode and leaves no temp files behind.
    ring.remove(K1)
    save_keyring(ring, path)
    assert set(load_keyring(path).installed_keys()) == {K2, K3}
    assert os.listdir(tmp_path) == ["keyring.json"]


def test_save_tightens_a_preexisting_wide_file(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_text("old")
    path.chmod(0o644)
    save_keyring(Keyring(K1), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_refuses_group_or_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    save_keyring(Keyring(K1), path)
    path.chmod(0o640)
    with pytest.raises(KeyringError, match="0600"):
        load_keyring(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"format": "something-else"}',
        b'{"format": "p2porch-gossip-keyring-v1"}',
        b'{"format": "p2porch-gossip-keyring-v1", "primary": "!!", "keys": []}',
        b'{"format": "p2porch-gossip-keyring-v1", "primary": "AAAA", "keys": ["AAAA"]}',
        b'{"format": "p2porch-gossip-keyring-v1", "primary": 3, "keys": 4}',
    ],
)
def test_load_refuses_corrupt_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "keyring.json"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyringError):
        load_keyring(path)


def test_load_missing_file_is_a_keyring_error(tmp_path: Path) -> None:
    with pytest.raises(KeyringError):
        load_keyring(tmp_path / "absent.json")


def test_wire_layout_is_version_hint_nonce_ciphertext_tag() -> None:
    """Pin the format: other implementations (and older nodes) must keep reading it."""
    sealed = Keyring(K1).seal(b"abc")
    assert sealed[0] == 1  # version
    assert sealed[1:5] == key_hint(K1)
    assert len(sealed) == 1 + 4 + 12 + 3 + 16
    # The version byte is authenticated: a reader that knew "version 2" could not be fooled.
    forged = bytes([2]) + sealed[1:]
    with pytest.raises(AuthenticationFailed):
        Keyring(K1).open(forged)
