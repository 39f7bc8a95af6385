"""Verified caller identity: JWT (JWS compact) verification with PyJWT and one public key.

A header such as ``x-caller-id`` can be set by anyone; where the caller matters, configure a
:class:`JwtVerifier` with the issuer's public key. ``verify(token)`` returns the ``sub`` claim or
raises :class:`CallerRejected` with a short machine-readable reason (journaled as outcome
``rejected``); neither the token nor the key ever appears in a message.

Accepted algorithms: ``EdDSA`` (Ed25519), ``ES256`` (P-256, raw ``r||s`` signature) and
``RS256`` (RSASSA-PKCS1-v1_5 with SHA-256). The algorithm must be one the verifier allows *and*
match the configured key's type, so ``none``, HMAC and algorithm-confusion tokens are refused.

PyJWT (``jwt.decode``) parses the token and verifies its signature. The claims (``exp``, ``nbf``,
``iat``, ``iss``, ``aud``, ``sub``) are then checked here, in a fixed order and against a clock
that ``now=`` can pin (PyJWT always reads the wall clock), so a token that fails several checks
gets a stable reason from :data:`REASONS`. Since PyJWT parses strictly, a token whose base64 is
not canonical (stray ``+``, non-zero trailing bits, a truncated signature) is ``malformed``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from serve_journal.errors import CallerRejected

__all__ = ["ALGORITHMS", "MAX_TOKEN_BYTES", "REASONS", "CallerRejected", "JwtVerifier"]

ALGORITHMS = ("EdDSA", "ES256", "RS256")
REASONS = (
    "malformed", "unsupported_algorithm", "bad_signature", "expired", "not_yet_valid",
    "missing_expiry", "wrong_issuer", "wrong_audience", "missing_subject",
)
MAX_TOKEN_BYTES = 16 * 1024

#: ``jwt.decode`` checks structure and signature; the claims are checked by ``_check_claims``.
_DECODE_OPTIONS: dict[str, Any] = {
    "verify_signature": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
    "verify_iss": False, "verify_aud": False, "verify_sub": False, "verify_jti": False,
    "require": [],
}


def _key_algorithm(key: Any) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"RSA public key has {key.key_size} bits; at least 2048 are required")
        return "RS256"
    raise ValueError(f"public key type {type(key).__name__} is not supported; "
                     "use an Ed25519, P-256 or RSA (>= 2048 bit) public key")


def _compact(token: Any) -> tuple[str, list[str]]:
    """``token`` as text and its three segments; refused if too long or not three segments."""
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise CallerRejected("malformed") from None
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
        raise CallerRejected("malformed")
    return token, token.split(".")


def _check_segment(segment: str) -> None:
    """Refuse an empty or ``=``-padded segment (PyJWT accepts both; they were never valid here)."""
    if not segment or "=" in segment:
        raise CallerRejected("malformed")


class JwtVerifier:
    """Verifies JWTs signed with one configured public key; picklable (carries the PEM).

    ``public_key_pem`` is a PEM ``PUBLIC KEY`` block (Ed25519, P-256 or RSA >= 2048 bit); its type
    fixes the one algorithm accepted, which ``algorithms`` must allow. ``issuer`` and ``audience``,
    when set, must match ``iss`` and (one of) ``aud``; ``leeway_s`` is the clock skew allowed on
    ``exp`` and ``nbf``; ``require_expiry=False`` accepts tokens without ``exp``.
    """

    def __init__(self, public_key_pem: bytes | str, algorithms: Iterable[str] = ALGORITHMS, *,
                 issuer: str | None = None, audience: str | None = None, leeway_s: float = 30.0,
                 require_expiry: bool = True) -> None:
        self._pem = public_key_pem.encode("ascii") if isinstance(public_key_pem, str) else bytes(public_key_pem)
        try:
            self._key = serialization.load_pem_public_key(self._pem)
        except ValueError:
            raise ValueError("public_key_pem must be a PEM 'PUBLIC KEY' block") from None
        self.algorithm = _key_algorithm(self._key)
        self.algorithms = tuple(algorithms)
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown:
            raise ValueError(f"algorithms must be drawn from {ALGORITHMS}, got {unknown}")
        if self.algorithm not in self.algorithms:
            raise ValueError(f"the public key is for {self.algorithm}, which algorithms "
                             f"{self.algorithms} does not allow")
        if leeway_s < 0:
            raise ValueError(f"leeway_s must be >= 0 seconds, got {leeway_s!r}")
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = float(leeway_s)
        self.require_expiry = require_expiry

    def __repr__(self) -> str:
        return (f"JwtVerifier(algorithm={self.algorithm!r}, issuer={self.issuer!r}, "
                f"audience={self.audience!r})")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_rebuild, (self._pem, self.algorithms, self.issuer, self.audience, self.leeway_s,
                           self.require_expiry))

    def verify(self, token: str | bytes, *, now: float | None = None) -> str:
        """The verified ``sub`` claim of ``token``; raises :class:`CallerRejected` otherwise."""
        return str(self.claims(token, now=now)["sub"])

    def verify_authorization(self, header_value: str | None, *, now: float | None = None) -> str:
        """Like :meth:`verify` for an ``Authorization: Bearer <token>`` header value."""
        if not header_value:
            raise CallerRejected("malformed")
        scheme, _, token = header_value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise CallerRejected("malformed")
        return self.verify(token.strip(), now=now)

    def claims(self, token: str | bytes, *, now: float | None = None) -> Mapping[str, Any]:
        """All claims of a verified token (signature and time/issuer/audience checks passed)."""
        text, (header_b64, payload_b64, signature_b64) = _compact(token)
        _check_segment(header_b64)
        try:
            header = jwt.get_unverified_header(text)
        except jwt.PyJWTError:
            raise CallerRejected("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms or alg != self.algorithm:
            raise CallerRejected("unsupported_algorithm")
        if "crit" in header:  # no critical extensions are understood, so none may be required
            raise CallerRejected("malformed")
        _check_segment(payload_b64)
        _check_segment(signature_b64)
        try:
            claims = jwt.decode(text, self._key, algorithms=[self.algorithm],
                                options=_DECODE_OPTIONS)
        except jwt.InvalidSignatureError:
            raise CallerRejected("bad_signature") from None
        except jwt.InvalidAlgorithmError:
            raise CallerRejected("unsupported_algorithm") from None
        except jwt.PyJWTError:
            raise CallerRejected("malformed") from None
        self._check_claims(claims, time.time() if now is None else now)
        return claims

    def _check_claims(self, claims: Mapping[str, Any], now: float) -> None:
        """exp (required unless ``require_expiry=False``), nbf, iat, iss, aud, then sub."""
        exp = claims.get("exp")
        if exp is None:
            if self.require_expiry:
                raise CallerRejected("missing_expiry")
        elif not _is_number(exp):
            raise CallerRejected("malformed")
        elif now > exp + self.leeway_s:
            raise CallerRejected("expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _is_number(nbf):
                raise CallerRejected("malformed")
            if now + self.leeway_s < nbf:
                raise CallerRejected("not_yet_valid")
        iat = claims.get("iat")
        if iat is not None and not _is_number(iat):
            raise CallerRejected("malformed")
        if self.issuer is not None and claims.get("iss") != self.issuer:
            raise CallerRejected("wrong_issuer")
        if self.audience is not None:
            aud = claims.get("aud")
            audiences = aud if isinstance(aud, list) else [aud]
            if self.audience not in audiences:
                raise CallerRejected("wrong_audience")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise CallerRejected("missing_subject")


def _is_number(value: Any) -> bool:
    """A finite JSON number (``NaN`` and ``Infinity``, which Python's JSON parser accepts, are
    not: an ``exp`` of ``Infinity`` must not mean "never expires")."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _rebuild(pem: bytes, algorithms: tuple[str, ...], issuer: str | None, audience: str | None,
             leeway_s: float, require_expiry: bool) -> JwtVerifier:
    return JwtVerifier(pem, algorithms, issuer=issuer, audience=audience, leeway_s=leeway_s,
                       require_expiry=require_expiry)
