"""JWT caller verification: keys and tokens made in the test, every rejection reason exercised."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pickle
import time

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from serve_journal.privacy.identity import REASONS, CallerRejected, JwtVerifier


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(private_key, alg: str, claims: dict, header: dict | None = None) -> str:
    head = b64(json.dumps({"alg": alg, "typ": "JWT", **(header or {})}).encode())
    body = b64(json.dumps(claims).encode())
    signed = f"{head}.{body}".encode()
    if alg == "EdDSA":
        sig = private_key.sign(signed)
    elif alg == "ES256":
        r, s = decode_dss_signature(private_key.sign(signed, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    elif alg == "RS256":
        sig = private_key.sign(signed, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "HS256":
        sig = hmac.new(private_key, signed, hashlib.sha256).digest()
    else:
        sig = b""
    return f"{head}.{body}.{b64(sig)}"


def pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


KEYS = {
    "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
}


def claims(**extra) -> dict:
    now = int(time.time())
    return {"sub": "svc-payments", "iat": now, "exp": now + 300, **extra}


@pytest.mark.parametrize("alg", sorted(KEYS))
def test_valid_tokens_give_the_subject(alg):
    verifier = JwtVerifier(pem(KEYS[alg]), issuer="idp", audience="journal")
    token = sign(KEYS[alg], alg, claims(iss="idp", aud=["other", "journal"]))
    assert verifier.verify(token) == "svc-payments"
    assert verifier.verify(token.encode()) == "svc-payments"
    assert verifier.verify_authorization(f"Bearer {token}") == "svc-payments"
    assert verifier.claims(token)["iss"] == "idp"


def reason(verifier: JwtVerifier, token, **kwargs) -> str:
    with pytest.raises(CallerRejected) as info:
        verifier.verify(token, **kwargs)
    assert info.value.reason in REASONS
    assert str(info.value) == info.value.reason  # never the token
    return info.value.reason


@pytest.mark.parametrize("alg", sorted(KEYS))
def test_bad_signature_and_tampering(alg):
    verifier = JwtVerifier(pem(KEYS[alg]))
    token = sign(KEYS[alg], alg, claims())
    head, body, sig = token.split(".")
    forged_body = b64(json.dumps(claims(sub="admin")).encode())
    assert reason(verifier, f"{head}.{forged_body}.{sig}") == "bad_signature"
    other = {"EdDSA": ed25519.Ed25519PrivateKey.generate(),
             "ES256": ec.generate_private_key(ec.SECP256R1()),
             "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048)}[alg]
    assert reason(verifier, sign(other, alg, claims())) == "bad_signature"
    assert reason(verifier, f"{head}.{body}.{b64(b'x' * 64)}") == "bad_signature"


def test_time_claims():
    key = KEYS["EdDSA"]
    verifier = JwtVerifier(pem(key), leeway_s=30)
    now = time.time()
    assert reason(verifier, sign(key, "EdDSA", claims(exp=int(now) - 31))) == "expired"
    assert verifier.verify(sign(key, "EdDSA", claims(exp=int(now) - 29)), now=int(now)) == "svc-payments"
    assert reason(verifier, sign(key, "EdDSA", claims(nbf=int(now) + 60))) == "not_yet_valid"
    # Python's JSON parser reads Infinity and NaN: neither may mean "never expires".
    for odd in (float("inf"), float("nan")):
        assert reason(verifier, sign(key, "EdDSA", claims(exp=odd))) == "malformed"
    assert reason(verifier, sign(key, "EdDSA", claims(nbf=float("-inf")))) == "malformed"
    no_exp = {"sub": "svc"}
    assert reason(verifier, sign(key, "EdDSA", no_exp)) == "missing_expiry"
    assert JwtVerifier(pem(key), require_expiry=False).verify(sign(key, "EdDSA", no_exp)) == "svc"
    assert reason(verifier, sign(key, "EdDSA", claims(exp="tomorrow"))) == "malformed"


def test_issuer_audience_subject():
    key = KEYS["ES256"]
    verifier = JwtVerifier(pem(key), issuer="idp", audience="journal")
    assert reason(verifier, sign(key, "ES256", claims(iss="evil", aud="journal"))) == "wrong_issuer"
    assert reason(verifier, sign(key, "ES256", claims(iss="idp", aud="other"))) == "wrong_audience"
    assert reason(verifier, sign(key, "ES256", claims(iss="idp"))) == "wrong_audience"
    assert reason(verifier, sign(key, "ES256", claims(iss="idp", aud="journal", sub=""))) == "missing_subject"
    assert reason(verifier, sign(key, "ES256", claims(iss="idp", aud="journal", sub=7))) == "missing_subject"


def test_algorithm_confusion_is_refused():
    ed = KEYS["EdDSA"]
    verifier = JwtVerifier(pem(ed))
    # "none", HMAC keyed with the public key, and a different asymmetric algorithm
    assert reason(verifier, sign(None, "none", claims())) == "unsupported_algorithm"
    assert reason(verifier, sign(pem(ed), "HS256", claims())) == "unsupported_algorithm"
    assert reason(verifier, sign(KEYS["ES256"], "ES256", claims())) == "unsupported_algorithm"
    assert reason(verifier, sign(ed, "EdDSA", claims(), header={"crit": ["exp"]})) == "malformed"
    with pytest.raises(ValueError, match="EdDSA, which algorithms"):
        JwtVerifier(pem(ed), algorithms=("RS256",))
    with pytest.raises(ValueError, match="2048"):
        JwtVerifier(pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))


@pytest.mark.parametrize("token", [
    "", "abc", "a.b", "a.b.c.d", "a.b.c", "eyJhbGciOiJFZERTQSJ9..sig", "x" * 20000,
    b64(b"[1]") + "." + b64(b"{}") + ".AA", b"\xff.\xff.\xff", "a=.b.c", None,
])
def test_malformed_tokens(token):
    assert reason(JwtVerifier(pem(KEYS["EdDSA"])), token) in ("malformed", "unsupported_algorithm")


def test_authorization_header_forms():
    verifier = JwtVerifier(pem(KEYS["EdDSA"]))
    for value in (None, "", "Basic abc", "Bearer ", "token-without-scheme"):
        with pytest.raises(CallerRejected, match="^malformed$"):
            verifier.verify_authorization(value)


def test_secret_looking_token_is_not_echoed_and_verifier_pickles():
    key = KEYS["RS256"]
    verifier = JwtVerifier(pem(key), audience="journal")
    token = sign(key, "RS256", claims(aud="elsewhere", secret="s3cr3t-canary"))
    with pytest.raises(CallerRejected) as info:
        verifier.verify(token)
    assert "canary" not in repr(info.value) and token not in repr(info.value)
    clone = pickle.loads(pickle.dumps(verifier))
    assert clone.verify(sign(key, "RS256", claims(aud="journal"))) == "svc-payments"
    assert "journal" in repr(clone)


@pytest.mark.parametrize("alg", sorted(KEYS))
def test_tokens_made_by_pyjwt_verify(alg):
    token = jwt.encode(claims(iss="idp", aud="journal"), KEYS[alg], algorithm=alg)
    assert JwtVerifier(pem(KEYS[alg]), issuer="idp", audience="journal").verify(token) == "svc-payments"


def test_what_pyjwt_would_accept_but_the_verifier_refuses():
    ed = KEYS["EdDSA"]
    verifier = JwtVerifier(pem(ed))
    head, body, sig = sign(ed, "EdDSA", claims()).split(".")
    # '=' padding, an empty payload, a critical extension PyJWT understands ("b64")
    assert reason(verifier, f"{head}.{body}.{sig}==") == "malformed"
    assert reason(verifier, f"{head}.{body}=.{sig}") == "malformed"
    assert reason(verifier, f"{head}..{sig}") == "malformed"
    assert reason(verifier, sign(ed, "EdDSA", claims(), header={"crit": ["b64"], "b64": True})) == "malformed"
    # algorithms PyJWT supports but the verifier does not
    rsa_key = KEYS["RS256"]
    rsa_verifier = JwtVerifier(pem(rsa_key))
    for alg in ("PS256", "RS512", "HS256", "none"):
        head, body, sig = sign(rsa_key, "RS256", claims()).split(".")
        other_head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        assert reason(rsa_verifier, f"{other_head}.{body}.{sig}") == "unsupported_algorithm"
    # a future iat is not a reason to refuse (only exp and nbf are time checks)
    assert verifier.verify(sign(ed, "EdDSA", claims(iat=int(time.time()) + 3600))) == "svc-payments"
    # a numeric string is not a time
    assert reason(verifier, sign(ed, "EdDSA", claims(exp=str(int(time.time()) + 300)))) == "malformed"


def test_now_pins_the_clock():
    key = KEYS["EdDSA"]
    verifier = JwtVerifier(pem(key), leeway_s=10)
    token = sign(key, "EdDSA", {"sub": "svc", "nbf": 1_000_000, "exp": 2_000_000})
    assert verifier.verify(token, now=1_500_000) == "svc"
    assert verifier.verify(token, now=999_990) == "svc"  # nbf within the leeway
    assert verifier.verify(token, now=2_000_010) == "svc"  # exp within the leeway
    assert reason(verifier, token, now=999_989) == "not_yet_valid"
    assert reason(verifier, token, now=2_000_011) == "expired"
    assert reason(verifier, token) == "expired"  # the wall clock when now is not given
