"""Tests for wirehub.hub.auth: token verification, minting, room globs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import warnings

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from wirehub.hub.auth import AuthError, Claims, TokenVerifier, glob_match, mint_token

SECRET = "test-secret-0123456789-abcdefghijklmnop"  # >= 32 bytes: no short-key warning
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict, payload: dict, key: bytes | None = None, signature: bytes | None = None) -> str:
    """A JWT built by hand (for tokens PyJWT refuses to produce)."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    if signature is None:
        signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest() if key else b""
    return signing_input + "." + b64(signature)


def hs(payload: dict, secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def verifier(clock: Clock | None = None, **kw) -> TokenVerifier:
    kw.setdefault("secret", SECRET)
    return TokenVerifier(clock=clock or Clock(), **kw)


def refused(v: TokenVerifier, token) -> AuthError:
    with pytest.raises(AuthError) as info:
        v.verify(token)
    err = info.value
    assert err.code == "unauthorized"
    assert err.message == str(err)
    return err


# --------------------------------------------------------------------------- keys


def _pems(private_key) -> tuple[bytes, bytes]:
    priv = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return priv, pub


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, bytes]:
    return _pems(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def other_rsa_keys() -> tuple[bytes, bytes]:
    return _pems(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_keys() -> tuple[bytes, bytes]:
    return _pems(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(scope="module")
def ec384_keys() -> tuple[bytes, bytes]:
    return _pems(ec.generate_private_key(ec.SECP384R1()))


# --------------------------------------------------------------------------- HS256 round trip


def test_mint_verify_round_trip():
    clock = Clock()
    token = mint_token(
        SECRET, "alice", rooms=["chat.*", "team/*/general"], publish=["chat.lobby"],
        ttl=600, name="Alice", clock=clock,
    )
    claims = verifier(clock).verify(token)
    assert claims == Claims(
        sub="alice", exp=T0 + 600, rooms=("chat.*", "team/*/general"),
        publish=("chat.lobby",), name="Alice",
    )
    assert isinstance(claims.exp, float)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False})["iat"] == int(T0)


def test_absent_claims_are_none_and_empty_lists_grant_nothing():
    clock = Clock()
    claims = verifier(clock).verify(mint_token(SECRET, "bob", clock=clock))
    assert (claims.rooms, claims.publish, claims.name) == (None, None, None)
    claims = verifier(clock).verify(mint_token(SECRET, "bob", rooms=[], publish=[], clock=clock))
    assert (claims.rooms, claims.publish) == ((), ())
    assert not claims.may_join("x") and not claims.may_publish("x")


def test_mint_exp_rounds_up_so_token_lives_at_least_ttl():
    clock = Clock(T0 + 0.5)
    claims = verifier(clock).verify(mint_token(SECRET, "u", ttl=0.3, clock=clock))
    assert claims.exp == T0 + 1


def test_extra_claims_are_ignored():
    clock = Clock()
    token = hs({"sub": "u", "exp": T0 + 10, "iat": T0, "iss": "me", "jti": "x", "role": "admin"})
    assert verifier(clock).verify(token).sub == "u"


# --------------------------------------------------------------------------- time


def test_expired_token_refused_by_injected_clock():
    clock = Clock()
    token = mint_token(SECRET, "alice", ttl=60, clock=clock)
    v = verifier(clock)
    clock.now = T0 + 59.9
    assert v.verify(token).sub == "alice"
    clock.now = T0 + 60  # exp <= now: expired (PyJWT's convention)
    err = refused(v, token)
    assert "expired at 2027-01-15T08:01:00Z" in err.message
    assert '{"op":"refresh"}' in err.message


def test_leeway():
    clock = Clock()
    token = mint_token(SECRET, "alice", ttl=60, clock=clock)
    v = verifier(clock, leeway=10)
    clock.now = T0 + 69.9
    assert v.verify(token).sub == "alice"
    clock.now = T0 + 70
    assert "expired" in refused(v, token).message


def test_nbf_in_the_future_refused_unless_within_leeway():
    clock = Clock()
    token = hs({"sub": "u", "exp": T0 + 100, "nbf": T0 + 5})
    assert "not valid before" in refused(verifier(clock), token).message
    assert verifier(clock, leeway=5).verify(token).sub == "u"


def test_exp_required_by_default():
    clock = Clock()
    token = mint_token(SECRET, "u", ttl=None, clock=clock)
    assert "'exp'" in refused(verifier(clock), token).message
    claims = verifier(clock, require_exp=False).verify(token)
    assert claims.exp is None


def test_expires_in():
    clock = Clock()
    v = verifier(clock)
    claims = v.verify(mint_token(SECRET, "u", ttl=300, clock=clock))
    assert v.expires_in(claims) == 300
    clock.now += 100.5
    assert v.expires_in(claims) == pytest.approx(199.5)
    assert v.expires_in(Claims(sub="u", exp=None, rooms=None, publish=None)) is None


# --------------------------------------------------------------------------- claim types


@pytest.mark.parametrize(
    ("payload", "expect"),
    [
        ({"exp": T0 + 10}, "no 'sub'"),
        ({"sub": 42, "exp": T0 + 10}, "'sub' must be a non-empty string, got number"),
        ({"sub": "", "exp": T0 + 10}, "empty string"),
        ({"sub": ["a"], "exp": T0 + 10}, "got list"),
        ({"sub": None, "exp": T0 + 10}, "got null"),
        ({"sub": "u", "exp": "9999999999"}, "'exp' must be a number"),
        ({"sub": "u", "exp": True}, "'exp' must be a number"),
        ({"sub": "u", "exp": None}, "'exp' must be a number"),
        ({"sub": "u", "exp": T0 + 10, "rooms": "chat.*"}, "'rooms' must be a list"),
        ({"sub": "u", "exp": T0 + 10, "rooms": {"a": 1}}, "'rooms' must be a list"),
        ({"sub": "u", "exp": T0 + 10, "rooms": None}, "'rooms' must be a list"),
        ({"sub": "u", "exp": T0 + 10, "rooms": ["a", 1]}, "item 1 is number"),
        ({"sub": "u", "exp": T0 + 10, "publish": "x"}, "'publish' must be a list"),
        ({"sub": "u", "exp": T0 + 10, "publish": [None]}, "item 0 is null"),
        ({"sub": "u", "exp": T0 + 10, "name": 5}, "'name' must be a string"),
        ({"sub": "u", "exp": T0 + 10, "iat": "yesterday"}, "'iat' must be a number"),
        ({"sub": "u", "exp": T0 + 10, "nbf": [1]}, "'nbf' must be a number"),
        ({"sub": "u", "exp": T0 + 10, "aud": "other-service"}, "audience"),
    ],
)
def test_claim_types_are_strict(payload, expect):
    err = refused(verifier(), hs(payload))
    assert expect in err.message


def test_non_finite_exp_refused():
    # JSON allows neither, but Python's json (used by PyJWT) parses Infinity / NaN / huge ints.
    for exp in ("Infinity", "NaN", "1" + "0" * 400):
        body = '{"sub":"u","exp":%s}' % exp
        signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(body.encode())
        sig = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
        err = refused(verifier(), signing_input + "." + b64(sig))
        assert "'exp' must be a finite number" in err.message


# --------------------------------------------------------------------------- signatures & algorithms


def test_wrong_secret_refused():
    token = mint_token("another-secret-that-is-long-enough-xx", "u", clock=Clock())
    err = refused(verifier(), token)
    assert "signature does not match the server's secret" in err.message


def test_tampered_payload_refused():
    token = mint_token(SECRET, "u", rooms=["public"], clock=Clock())
    h, _, s = token.split(".")
    forged = b64(json.dumps({"sub": "u", "exp": T0 + 3600}).encode())  # drop the rooms limit
    assert "signature does not match" in refused(verifier(), f"{h}.{forged}.{s}").message


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_refused(alg):
    token = raw_token({"alg": alg, "typ": "JWT"}, {"sub": "u", "exp": T0 + 10})
    err = refused(verifier(), token)
    assert "is not accepted" in err.message and "HS256" in err.message


def test_alg_none_from_pyjwt_refused():
    token = jwt.encode({"sub": "u", "exp": T0 + 10}, None, algorithm="none")
    assert "is not accepted" in refused(verifier(), token).message


def test_unlisted_hmac_variant_refused():
    long_secret = SECRET * 2
    token = jwt.encode({"sub": "u", "exp": T0 + 10}, long_secret, algorithm="HS512")
    assert "'HS512' is not accepted" in refused(verifier(secret=long_secret), token).message
    assert verifier(secret=long_secret, algorithms=["HS256", "HS512"]).verify(token).sub == "u"


@pytest.mark.parametrize("alg", [5, None, ["HS256"], "HS256 ", "hs256", "x" * 500])
def test_odd_header_alg_refused(alg):
    token = raw_token({"alg": alg}, {"sub": "u", "exp": T0 + 10}, key=SECRET.encode())
    err = refused(verifier(), token)
    assert "not accepted" in err.message or "no 'alg'" in err.message
    assert "x" * 20 not in err.message  # unknown names are not echoed


def test_missing_alg_refused():
    token = raw_token({"typ": "JWT"}, {"sub": "u", "exp": T0 + 10}, key=SECRET.encode())
    assert "no 'alg'" in refused(verifier(), token).message


def test_hs256_token_refused_when_only_rs256_configured(rsa_keys):
    _, pub = rsa_keys
    v = TokenVerifier(public_key=pub, algorithms=["RS256"], clock=Clock())
    err = refused(v, mint_token(SECRET, "u", clock=Clock()))
    assert "'HS256' is not accepted" in err.message and "RS256" in err.message


def test_rs256_round_trip(rsa_keys, other_rsa_keys):
    priv, pub = rsa_keys
    clock = Clock()
    v = TokenVerifier(public_key=pub.decode(), algorithms=["RS256"], clock=clock)
    token = jwt.encode({"sub": "svc", "exp": T0 + 60, "rooms": ["a.*"]}, priv, algorithm="RS256")
    claims = v.verify(token)
    assert (claims.sub, claims.rooms) == ("svc", ("a.*",))
    # bytes PEM works too
    assert TokenVerifier(public_key=pub, algorithms=["RS256"], clock=clock).verify(token).sub == "svc"
    # signed by someone else's key
    other = jwt.encode({"sub": "svc", "exp": T0 + 60}, other_rsa_keys[0], algorithm="RS256")
    assert "does not match the server's public key" in refused(v, other).message


def test_es256_round_trip(ec_keys):
    priv, pub = ec_keys
    clock = Clock()
    v = TokenVerifier(public_key=pub, algorithms=("ES256",), clock=clock)
    token = jwt.encode({"sub": "dev-1", "exp": T0 + 60, "publish": ["telemetry.*"]}, priv, algorithm="ES256")
    claims = v.verify(token)
    assert (claims.sub, claims.publish) == ("dev-1", ("telemetry.*",))
    clock.now = T0 + 61
    assert "expired" in refused(v, token).message
    # ES256 only: an HS256 token is refused
    assert "not accepted" in refused(v, mint_token(SECRET, "u", clock=Clock())).message


def test_mixed_families(rsa_keys):
    priv, pub = rsa_keys
    v = TokenVerifier(secret=SECRET, public_key=pub, algorithms=["HS256", "RS256"], clock=Clock())
    assert v.verify(mint_token(SECRET, "h", clock=Clock())).sub == "h"
    assert v.verify(jwt.encode({"sub": "r", "exp": T0 + 9}, priv, algorithm="RS256")).sub == "r"


@pytest.mark.parametrize("as_text", [False, True])
def test_hs256_signed_with_public_key_confusion_refused(rsa_keys, as_text):
    _, pub = rsa_keys
    key = pub.decode() if as_text else pub
    payload = {"sub": "admin", "exp": T0 + 3600}
    # The attacker knows the public key and uses its PEM bytes as an HMAC secret.
    forged = raw_token({"alg": "HS256", "typ": "JWT"}, payload, key=pub)
    forged_stripped = raw_token({"alg": "HS256", "typ": "JWT"}, payload, key=pub.strip())

    rs_only = TokenVerifier(public_key=key, algorithms=["RS256"], clock=Clock())
    for token in (forged, forged_stripped):
        assert "'HS256' is not accepted" in refused(rs_only, token).message

    # Even with HS256 also enabled, the HMAC key is the secret, never the public key.
    mixed = TokenVerifier(secret=SECRET, public_key=key, algorithms=["RS256", "HS256"], clock=Clock())
    for token in (forged, forged_stripped):
        assert "does not match the server's secret" in refused(mixed, token).message


def test_rs_token_with_es_header_refused(rsa_keys, ec_keys):
    priv, _ = rsa_keys
    _, ec_pub = ec_keys
    v = TokenVerifier(public_key=ec_pub, algorithms=["ES256"], clock=Clock())
    rs = jwt.encode({"sub": "u", "exp": T0 + 9}, priv, algorithm="RS256")
    h, p, s = rs.split(".")
    lying = b64(json.dumps({"alg": "ES256", "typ": "JWT"}).encode()) + "." + p + "." + s
    refused(v, lying)
    refused(v, rs)


# --------------------------------------------------------------------------- not a JWT


@pytest.mark.parametrize(
    "token",
    [
        "abc",
        "a.b.c",
        "a.b",
        "....",
        "eyJhbGciOiJIUzI1NiJ9",
        b64(b"[1,2]") + "." + b64(b"{}") + ".",
        b64(b'{"alg":"HS256"}') + "." + b64(b"[1]") + "." + b64(b"sig"),
        b64(b'{"alg":"HS256"}') + ".!!!." + b64(b"sig"),
        "\u00e9\u00e9.\u00e9.\u00e9",
    ],
)
def test_garbage_is_not_a_jwt(token):
    assert "not a valid JWT" in refused(verifier(), token).message or "signature" in refused(verifier(), token).message


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token(token):
    assert "missing token" in refused(verifier(), token).message


@pytest.mark.parametrize("token", [123, b"a.b.c", ["x"], {"t": 1}])
def test_non_string_token(token):
    assert "must be a string" in refused(verifier(), token).message


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300) | st.lists(st.text(alphabet="abcXYZ-_=", max_size=40), min_size=1, max_size=5).map(".".join))
def test_arbitrary_input_only_raises_auth_error(token):
    try:
        verifier().verify(token)
    except AuthError as err:
        assert err.code == "unauthorized"


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.lists(st.integers() | st.text(max_size=3), max_size=3), max_size=6))
def test_arbitrary_signed_payloads_only_raise_auth_error(payload):
    try:
        claims = verifier().verify(hs(payload))
    except AuthError:
        return
    assert isinstance(claims.sub, str) and claims.sub


# --------------------------------------------------------------------------- construction


def test_config_errors(rsa_keys, ec_keys, ec384_keys):
    rsa_priv, rsa_pub = rsa_keys
    ec_priv, ec_pub = ec_keys
    cases = [
        (dict(), "needs a secret"),
        (dict(secret=""), "needs a secret"),
        (dict(algorithms=["RS256"]), "needs a public key"),
        (dict(secret=SECRET, algorithms=["RS256"]), "needs a public key"),
        (dict(secret=SECRET, algorithms=["HS257"]), "unknown token algorithm"),
        (dict(secret=SECRET, algorithms=["none"]), "never accepted"),
        (dict(secret=SECRET, algorithms=[]), "no token algorithm"),
        (dict(secret=SECRET, public_key=rsa_pub, algorithms=["RS256"]), "no HMAC algorithm"),
        (dict(secret=SECRET, public_key=rsa_pub), "no RS/PS/ES algorithm"),
        (dict(public_key=rsa_priv, algorithms=["RS256"]), "private key"),
        (dict(public_key=ec_priv, algorithms=["ES256"]), "private key"),
        (dict(public_key=ec_pub, algorithms=["RS256"]), "not a usable RS256"),
        (dict(public_key=rsa_pub, algorithms=["ES256"]), "not a usable ES256"),
        (dict(public_key=ec384_keys[1], algorithms=["ES256"]), "not a usable ES256"),
        (dict(public_key=rsa_pub, algorithms=["RS256", "ES256"]), "not a usable ES256"),
        (dict(public_key="not a pem", algorithms=["RS256"]), "not a usable RS256"),
        (dict(secret=rsa_pub.decode()), "looks like a PEM"),
        (dict(secret=SECRET, leeway=-1), "leeway"),
        (dict(secret=SECRET, leeway=float("nan")), "leeway"),
    ]
    for kwargs, expect in cases:
        with pytest.raises(ValueError, match=expect):
            TokenVerifier(**kwargs)


def test_algorithm_names_are_normalized(ec_keys):
    v = TokenVerifier(public_key=ec_keys[1], algorithms="es256")
    assert v.algorithms == ("ES256",)
    assert TokenVerifier(secret=SECRET, algorithms=["hs256", "HS256"]).algorithms == ("HS256",)


def test_short_secret_warns_once_at_construction_not_per_verify():
    with pytest.warns(UserWarning, match="secret is 3 bytes"):
        v = TokenVerifier(secret="dev", clock=Clock())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        token = mint_token("dev", "u", clock=Clock())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert v.verify(token).sub == "u"


def test_secret_too_short_for_a_listed_algorithm_warns():
    with pytest.warns(UserWarning, match="at least 64 random bytes for HS512"):
        TokenVerifier(secret=SECRET, algorithms=["HS256", "HS512"])


def test_repr_hides_key_material(rsa_keys):
    v = TokenVerifier(secret=SECRET, public_key=rsa_keys[1], algorithms=["HS256", "RS256"])
    assert SECRET not in repr(v) and "BEGIN" not in repr(v)


# --------------------------------------------------------------------------- mint_token


@pytest.mark.parametrize(
    ("args", "kwargs", "expect"),
    [
        (("", "u"), {}, "secret"),
        ((SECRET, ""), {}, "sub"),
        ((SECRET, 5), {}, "sub"),
        ((SECRET, "u"), {"rooms": "chat.*"}, "not a single string"),
        ((SECRET, "u"), {"publish": ["a", 1]}, "only strings"),
        ((SECRET, "u"), {"ttl": 0}, "positive"),
        ((SECRET, "u"), {"ttl": -5}, "positive"),
        ((SECRET, "u"), {"ttl": float("inf")}, "positive"),
        ((SECRET, "u"), {"ttl": "60"}, "number"),
        ((SECRET, "u"), {"name": 3}, "name"),
    ],
)
def test_mint_token_rejects_bad_arguments(args, kwargs, expect):
    with pytest.raises(ValueError, match=expect):
        mint_token(*args, **kwargs)


@settings(max_examples=150, deadline=None)
@given(
    sub=st.text(min_size=1, max_size=64),
    rooms=st.none() | st.lists(st.text(max_size=32), max_size=8),
    publish=st.none() | st.lists(st.text(max_size=32), max_size=8),
    name=st.none() | st.text(max_size=32),
    ttl=st.none() | st.floats(min_value=0.001, max_value=10 * 365 * 86400),
)
def test_mint_verify_round_trips_arbitrary_values(sub, rooms, publish, name, ttl):
    clock = Clock()
    token = mint_token(SECRET, sub, rooms=rooms, publish=publish, ttl=ttl, name=name, clock=clock)
    claims = verifier(clock, require_exp=False).verify(token)
    assert claims.sub == sub
    assert claims.rooms == (None if rooms is None else tuple(rooms))
    assert claims.publish == (None if publish is None else tuple(publish))
    assert claims.name == name
    if ttl is None:
        assert claims.exp is None
    else:
        assert T0 + ttl <= claims.exp < T0 + ttl + 1


# --------------------------------------------------------------------------- globs


@pytest.mark.parametrize(
    ("pattern", "room", "expected"),
    [
        ("lobby", "lobby", True),
        ("lobby", "lobby2", False),
        ("lobby", "Lobby", False),
        ("Lobby", "lobby", False),
        ("*", "", True),
        ("*", "anything/at.all", True),
        ("chat.*", "chat.lobby", True),
        ("chat.*", "chat.", True),
        ("chat.*", "chat", False),
        ("chat.*", "chatXlobby", False),  # "." is literal
        ("chat.*", "Chat.lobby", False),
        ("chat.*", "chat.a.b/c", True),  # no path semantics: "*" crosses "." and "/"
        ("team/*/general", "team/red/general", True),
        ("team/*/general", "team/red/blue/general", True),
        ("team/*/general", "team//general", True),
        ("team/*/general", "team/red/random", False),
        ("room-?", "room-1", True),
        ("room-?", "room-12", False),
        ("room-?", "room-", False),
        ("room-[abc]", "room-b", True),
        ("room-[abc]", "room-d", False),
        ("room-[abc]", "room-B", False),
        ("room-[a-c]", "room-c", True),
        ("room-[!a-c]", "room-d", True),
        ("room-[!a-c]", "room-a", False),
        ("[*]", "*", True),
        ("[*]", "x", False),
        ("a+b(c)", "a+b(c)", True),  # regex metacharacters are literal
        ("a+b(c)", "aab(c)", False),
        ("user.$id", "user.$id", True),
        ("x*", "x\ny", True),
        ("", "", True),
        ("", "a", False),
        ("*.private", "dm.private", True),
        ("*.private", "dm.private.not", False),
    ],
)
def test_glob_match(pattern, room, expected):
    assert glob_match(pattern, room) is expected


# --------------------------------------------------------------------------- permissions


def claims(rooms=None, publish=None) -> Claims:
    return Claims(sub="u", exp=None, rooms=rooms, publish=publish)


def test_no_room_claims_allow_everything():
    c = claims()
    assert c.may_join("any.room") and c.may_publish("any.room")


def test_rooms_only_publish_follows_rooms():
    c = claims(rooms=("chat.*", "team/*/general"))
    assert c.may_join("chat.lobby") and c.may_publish("chat.lobby")
    assert c.may_join("team/x/general") and c.may_publish("team/x/general")
    assert not c.may_join("admin") and not c.may_publish("admin")


def test_publish_only_restricts_publishing_not_joining():
    c = claims(publish=("announce",))
    assert c.may_join("anything")
    assert c.may_publish("announce") and not c.may_publish("anything")


def test_publish_is_independent_of_rooms():
    c = claims(rooms=("chat.*",), publish=("chat.lobby", "telemetry.*"))
    assert c.may_publish("chat.lobby") and not c.may_publish("chat.other")
    assert c.may_join("chat.other")
    # write-only: may publish where it may not join
    assert c.may_publish("telemetry.dev1") and not c.may_join("telemetry.dev1")


def test_empty_globs_grant_nothing():
    c = claims(rooms=(), publish=None)
    assert not c.may_join("a") and not c.may_publish("a")
    c = claims(rooms=None, publish=())
    assert c.may_join("a") and not c.may_publish("a")


# --------------------------------------------------------------------------- no leaks


def test_error_messages_never_contain_secret_or_token(rsa_keys):
    _, pub = rsa_keys
    clock = Clock()
    v = verifier(clock)
    good = mint_token(SECRET, "u", ttl=10, clock=clock)
    tokens = [
        mint_token("wrong-secret-wrong-secret-wrong-secret", "u", clock=clock),
        hs({"sub": 1, "exp": T0 + 9}),
        hs({"sub": "u", "exp": "x"}),
        hs({"sub": "u", "exp": T0 + 9, "rooms": SECRET}),  # even a claim holding the secret
        hs({"sub": "u", "exp": T0 + 9, "aud": SECRET}),
        hs({"sub": "u"}),
        raw_token({"alg": "none"}, {"sub": "u", "exp": T0 + 9}),
        raw_token({"alg": SECRET}, {"sub": "u", "exp": T0 + 9}),
        raw_token({"alg": "HS256"}, {"sub": "u", "exp": T0 + 9}, key=pub),
        good + "x",
        good[:-3],
        "not-a-jwt-" + SECRET,
    ]
    messages = []
    for token in tokens:
        err = refused(v, token)
        messages.append(err.message)
        for part in [token, *[p for p in token.split(".") if len(p) >= 8]]:
            assert part not in err.message
        assert part not in repr(err)
    clock.now = T0 + 11
    err = refused(v, good)
    messages.append(err.message)
    assert good not in err.message
    for message in messages:
        assert SECRET not in message
        assert SECRET[:16] not in message


# --------------------------------------------------------------------------- the send claim


def test_send_absent_follows_rooms():
    # no rooms claim: any room, any direct message; a rooms claim limits the user to rooms
    assert Claims(sub="u", exp=None, rooms=None, publish=None).may_send()
    assert not Claims(sub="u", exp=None, rooms=("chat.*",), publish=None).may_send()
    assert not Claims(sub="u", exp=None, rooms=(), publish=None).may_send()
    # publish alone does not restrict direct messages
    assert Claims(sub="u", exp=None, rooms=None, publish=("a",)).may_send()


def test_send_claim_wins_over_the_default():
    assert Claims(sub="u", exp=None, rooms=("chat.*",), publish=None, send=True).may_send()
    assert not Claims(sub="u", exp=None, rooms=None, publish=None, send=False).may_send()


def test_send_claim_is_read_from_the_token():
    v = verifier()
    assert v.verify(hs({"sub": "u", "exp": T0 + 60, "send": True})).send is True
    assert v.verify(hs({"sub": "u", "exp": T0 + 60, "send": False})).send is False
    assert v.verify(hs({"sub": "u", "exp": T0 + 60})).send is None


@pytest.mark.parametrize("value", ["true", 1, 0, None, ["*"], {"to": "*"}])
def test_send_claim_must_be_a_boolean(value):
    err = refused(verifier(), hs({"sub": "u", "exp": T0 + 60, "send": value}))
    assert "'send'" in err.message and "true or false" in err.message


def test_mint_send_claim():
    clock = Clock()
    v = verifier(clock)
    for send in (True, False):
        token = mint_token(SECRET, "u", rooms=["a"], send=send, clock=clock)
        assert v.verify(token).send is send
    token = mint_token(SECRET, "u", clock=clock)
    assert "send" not in jwt.decode(token, options={"verify_signature": False})
    with pytest.raises(ValueError, match="send"):
        mint_token(SECRET, "u", send="yes", clock=clock)  # type: ignore[arg-type]
