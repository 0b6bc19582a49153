"""The gossip keyring: AES-GCM sealing of every UDP packet and every TCP stream frame.

Why a keyring rather than one key: a cluster must be able to change its key while it runs.
Decryption accepts any installed key while encryption uses only the *primary*, so a rotation
is three cluster-wide steps, each of which leaves every pair of nodes able to talk::

    install(new) everywhere   # everyone can now read new, still writes old
    use(new) everywhere       # everyone writes new; stragglers still read it (installed)
    remove(old) everywhere    # nobody writes old any more

Wire format of one sealed payload (``OVERHEAD_BYTES`` = 33 bytes on top of the plaintext)::

    +---------+-------------+-----------------+-------------------------+
    | version | key hint    | nonce           | ciphertext || GCM tag  |
    | 1 byte  | 4 bytes     | 12 bytes random | len(plaintext) + 16     |
    +---------+-------------+-----------------+-------------------------+

* ``version`` lets the format change later; a reader refuses versions it does not know.
* ``key hint`` is a 4-byte fingerprint of the sealing key (SHA-256 over a domain label and the
  key, so it reveals nothing usable about the key). It lets the receiver try only the key
  that can work instead of every installed key -- a garbage flood then costs one hash-table
  look-up per packet, not one GCM attempt per installed key. Keys sharing a hint (1 in 2**32)
  are simply all tried, primary first.
* The associated data authenticates ``version || key hint || purpose``. ``purpose`` is not on
  the wire: it is ``b"udp"`` for datagrams and ``b"tcp"`` for stream frames, so a captured
  datagram cannot be replayed as a stream frame or the other way round.
* Nonces are 96 random bits from the OS. With random nonces AES-GCM stays safe up to about
  2**32 messages per key (NIST SP 800-38D); at a few hundred packets a second that is years,
  and keys rotate far sooner.

Not provided (as in memberlist): replay protection inside a purpose. SWIM tolerates replays --
every message carries an incarnation or a sequence number the core already orders by.

Every failure to open a sealed payload -- wrong key, a flipped bit, truncation, an unknown
version -- raises the one :class:`AuthenticationFailed`; the shell catches it, drops the input
and counts it (``bad_auth``). The class is pure: no sockets, no clock; the only side effects
are drawing nonces from ``os.urandom`` and the explicit file helpers at the bottom.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import KeyringError

__all__ = [
    "KEY_SIZES",
    "NONCE_BYTES",
    "OVERHEAD_BYTES",
    "PURPOSE_TCP",
    "PURPOSE_UDP",
    "AuthenticationFailed",
    "Keyring",
    "KeyringError",
    "generate_key",
    "key_hint",
    "load_keyring",
    "save_keyring",
]

WIRE_VERSION: Final = 1
HINT_BYTES: Final = 4
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
HEADER_BYTES: Final = 1 + HINT_BYTES + NONCE_BYTES
OVERHEAD_BYTES: Final = HEADER_BYTES + TAG_BYTES
"""Bytes a sealed payload adds to its plaintext; the core must leave this much MTU room."""

KEY_SIZES: Final = frozenset({16, 32})
"""AES-128 or AES-256 (AES-192 is legal for GCM but nobody needs a third choice)."""

PURPOSE_UDP: Final = b"udp"
PURPOSE_TCP: Final = b"tcp"

_HINT_DOMAIN: Final = b"p2porch-gossip-key-hint-v1\x00"
_FILE_FORMAT: Final = "p2porch-gossip-keyring-v1"


class AuthenticationFailed(KeyringError):
    """Sealed bytes that do not open under any installed key: drop them and count them.

    One error for every cause (wrong key, tampering, truncation, unknown version) so the
    shell has exactly one thing to catch and an attacker learns nothing from which it was.
    """


def generate_key(size: int = 32) -> bytes:
    """A fresh random AES key of ``size`` bytes (16 or 32)."""
    if size not in KEY_SIZES:
        raise KeyringError(f"key size must be one of {sorted(KEY_SIZES)} bytes, not {size}")
    return os.urandom(size)


def key_hint(key: bytes) -> bytes:
    """The 4-byte public fingerprint written in front of every payload sealed with ``key``."""
    return hashlib.sha256(_HINT_DOMAIN + key).digest()[:HINT_BYTES]


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray):
        raise KeyringError(f"a key is bytes, not {type(key).__name__}")
    if len(key) not in KEY_SIZES:
        raise KeyringError(f"key must be 16 or 32 bytes (AES-128/256), got {len(key)}")
    return bytes(key)


class Keyring:
    """The installed keys and which one is primary; seals and opens payloads.

    Mutable on purpose: the shell holds one keyring, operators change it while the node runs,
    and the next packet uses the new state. Keys are kept in install order with the primary
    first when decrypting, so the common case (peer uses the same primary) is one attempt.
    """

    def __init__(self, primary: bytes, others: Iterable[bytes] = ()) -> None:
        self._ciphers: dict[bytes, AESGCM] = {}
        self._hints: dict[bytes, bytes] = {}
        self._primary = b""
        self.install(primary)
        for key in others:
            self.install(key)
        self.use(primary)

    # ------------------------------------------------------------------ operations

    @property
    def primary(self) -> bytes:
        """The key every outgoing payload is sealed with."""
        return self._primary

    def installed_keys(self) -> tuple[bytes, ...]:
        """All installed keys, primary first, then in install order."""
        return (self._primary, *(k for k in self._ciphers if k != self._primary))

    def install(self, key: bytes) -> None:
        """Accept payloads sealed with ``key`` (idempotent); does not change the primary."""
        key = _check_key(key)
        if key not in self._ciphers:
            self._ciphers[key] = AESGCM(key)
            self._hints[key] = key_hint(key)

    def use(self, key: bytes) -> None:
        """Make an installed ``key`` the primary (install it first: a typo must not lock us out)."""
        key = _check_key(key)
        if key not in self._ciphers:
            raise KeyringError("cannot use a key that is not installed; install it first")
        self._primary = key

    def remove(self, key: bytes) -> None:
        """Stop accepting ``key``. Refuses the primary: ``use`` another key first."""
        key = _check_key(key)
        if key == self._primary:
            raise KeyringError("cannot remove the primary key; use another key first")
        if key not in self._ciphers:
            raise KeyringError("cannot remove a key that is not installed")
        del self._ciphers[key]
        del self._hints[key]

    # ------------------------------------------------------------------ sealing

    def seal(self, plaintext: bytes, purpose: bytes = PURPOSE_UDP) -> bytes:
        """Encrypt and authenticate ``plaintext`` under the primary key."""
        header = bytes((WIRE_VERSION,)) + self._hints[self._primary]
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self._primary].encrypt(nonce, plaintext, header + purpose)
        return header + nonce + sealed

    def open(self, data: bytes, purpose: bytes = PURPOSE_UDP) -> bytes:
        """Authenticate and decrypt ``data``; raise :class:`AuthenticationFailed` otherwise."""
        if len(data) < OVERHEAD_BYTES:
            raise AuthenticationFailed("sealed payload too short")
        if data[0] != WIRE_VERSION:
            raise AuthenticationFailed("unknown sealing version")
        header = bytes(data[: 1 + HINT_BYTES])
        hint = header[1:]
        nonce = bytes(data[1 + HINT_BYTES : HEADER_BYTES])
        body = bytes(data[HEADER_BYTES:])
        for key in self.installed_keys():
            if self._hints[key] != hint:
                continue
            try:
                return self._ciphers[key].decrypt(nonce, body, header + purpose)
            except InvalidTag:
                continue
        raise AuthenticationFailed("payload does not authenticate under any installed key")

    def __repr__(self) -> str:
        # Never print key material: hints only.
        hints = ", ".join(key_hint(k).hex() for k in self.installed_keys())
        return f"Keyring(primary={key_hint(self._primary).hex()}, keys=[{hints}])"


# ---------------------------------------------------------------------- persistence


def save_keyring(keyring: Keyring, path: str | os.PathLike[str]) -> None:
    """Write the keyring to ``path`` as JSON, mode 0600, atomically (temp file + rename).

    The file is created with 0600 from the first byte (never chmod-ed afterwards), fsync-ed,
    then renamed over the old one, so a crash leaves either the old or the new keyring.
    """
    target = Path(path)
    doc = {
        "format": _FILE_FORMAT,
        "primary": base64.b64encode(keyring.primary).decode("ascii"),
        "keys": [base64.b64encode(k).decode("ascii") for k in keyring.installed_keys()],
    }
    payload = json.dumps(doc, indent=2).encode("utf-8") + b"\n"
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # in case the temp file already existed with wider bits
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise KeyringError(f"cannot write keyring {target}: {exc}") from exc


def load_keyring(path: str | os.PathLike[str]) -> Keyring:
    """Read a keyring written by :func:`save_keyring`.

    Refuses a file that group or others may read or write (like ssh does for private keys):
    a key that leaked is worse than a node that does not start.
    """
    source = Path(path)
    try:
        mode = source.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyringError(f"keyring {source} has mode {stat.filemode(mode)}; need 0600")
        raw = source.read_bytes()
    except OSError as exc:
        raise KeyringError(f"cannot read keyring {source}: {exc}") from exc
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != _FILE_FORMAT:
            raise KeyringError(f"{source} is not a p2porch gossip keyring")
        primary = base64.b64decode(doc["primary"], validate=True)
        keys = [base64.b64decode(k, validate=True) for k in doc["keys"]]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise KeyringError(f"keyring {source} is corrupt: {exc}") from exc
    return Keyring(primary, keys)
