"""Token auth for the hub: verify JWTs, mint them, and match room globs.

Pure code -- no I/O, no asyncio.  The hub calls :meth:`TokenVerifier.verify`
on ``hello`` and ``refresh``; an :class:`AuthError` becomes an ``error`` frame
with ``code`` ``"unauthorized"``.  :meth:`Claims.may_join` and
:meth:`Claims.may_publish` run on every ``join`` / ``pub``, so room globs are
compiled once and cached (:func:`glob_match`).

Tokens are JWTs (RFC 7519) signed HS256 with the configured secret; RS256 /
ES256 (and the other RSA/ECDSA sizes) are accepted only when the verifier is
explicitly configured with a PEM public key and that algorithm.  Parsing and
signature checks are PyJWT's; this module picks the key by algorithm family,
checks the claims strictly, and turns every failure into a message that says
what is wrong and what to do -- without ever echoing the token or the secret.

Claims::

    sub      required, non-empty string            the user
    exp      number (unix seconds); required unless require_exp=False
    nbf      optional number; the token is refused before it (with leeway)
    iat      optional number (type-checked only)
    rooms    optional list of globs the user may join     (absent = any room)
    publish  optional list of globs the user may publish to (absent = the rooms globs)
    send     optional boolean: may the user send direct messages to other clients
             (absent = true for a token without 'rooms', false for one with 'rooms')
    name     optional string, a display name

Other claims are ignored, except ``aud``: a token restricted to an audience is
refused (this server has no audience configured, so it is not the audience).
"""

from __future__ import annotations

import functools
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from fnmatch import translate
from typing import Any

import jwt
from jwt.algorithms import get_default_algorithms

__all__ = [
    "SUPPORTED_ALGORITHMS",
    "AuthError",
    "Claims",
    "TokenVerifier",
    "glob_match",
    "mint_token",
]

_HMAC = ("HS256", "HS384", "HS512")
_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
SUPPORTED_ALGORITHMS: tuple[str, ...] = _HMAC + _ASYMMETRIC
"""Algorithm names a :class:`TokenVerifier` can be configured with."""

_REFRESH_HINT = 'get a new token and send it in {"op":"refresh"} (or in {"op":"hello"} when connecting)'


# --------------------------------------------------------------------------- errors


class AuthError(Exception):
    """A token was refused.  ``code`` is the hub error code, ``message`` the text for the client.

    The message says what is wrong and what to do; it never contains the token or the secret.
    """

    __slots__ = ("code", "message", "reason")

    #: ``reason`` is one of a fixed set, for metrics: missing, malformed, algorithm,
    #: signature, expired, not_yet_valid, claims (a claim missing or of the wrong type)
    def __init__(self, message: str, code: str = "unauthorized", *, reason: str = "claims") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason

    def __repr__(self) -> str:
        return f"AuthError({self.message!r}, code={self.code!r})"


# --------------------------------------------------------------------------- globs


@functools.lru_cache(maxsize=4096)
def _compile_glob(pattern: str) -> Callable[[str], re.Match[str] | None]:
    return re.compile(translate(pattern)).match


def glob_match(pattern: str, room: str) -> bool:
    """Whether ``room`` matches the glob ``pattern``.

    fnmatch syntax, case-sensitive, with no path semantics: ``*`` matches any run of
    characters (``.`` and ``/`` included), ``?`` exactly one character, ``[abc]`` /
    ``[a-z]`` one character of a class, ``[!abc]`` one character not in it.  Everything
    else, ``.`` and ``/`` included, is literal; there is no backslash escape (write
    ``[*]`` for a literal star).  Compiled patterns are cached.
    """
    return _compile_glob(pattern)(room) is not None


# --------------------------------------------------------------------------- claims


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token grants.

    ``rooms`` / ``publish`` are ``None`` when the claim is absent: no ``rooms`` claim means
    any room may be joined; no ``publish`` claim means publishing follows ``rooms``.  An
    empty tuple grants nothing.  ``send`` is ``None`` when absent: direct messages are then
    allowed only to a token without ``rooms`` (:meth:`may_send`).
    """

    sub: str
    exp: float | None
    rooms: tuple[str, ...] | None
    publish: tuple[str, ...] | None
    name: str | None = None
    send: bool | None = None

    def may_send(self) -> bool:
        """Whether the user may ``send`` direct messages to other clients.

        The ``send`` claim when present; without it, only a token that does not restrict
        rooms may: a token limited to some rooms is limited to them, and a direct message
        reaches any client whose id the sender learnt (from presence or a ``msg``), in rooms
        or not.  There are no per-target globs: a node cannot see the user of a client on
        another node without asking the broker for each message.
        """
        if self.send is None:
            return self.rooms is None
        return self.send

    def may_join(self, room: str) -> bool:
        """Whether the user may join ``room`` (one of the ``rooms`` globs matches, or no ``rooms`` claim)."""
        if self.rooms is None:
            return True
        return any(glob_match(p, room) for p in self.rooms)

    def may_publish(self, room: str) -> bool:
        """Whether the user may publish to ``room``.

        Checks the ``publish`` globs only, or -- when there is no ``publish`` claim -- the
        ``rooms`` globs (:meth:`may_join`).  It does not require the user to be a member of
        the room or to be allowed to join it: the protocol lets a client publish to a room it
        has not joined, and a ``publish`` claim may deliberately grant write-only rooms
        (e.g. a device that reports into ``telemetry.*`` but never subscribes).
        """
        if self.publish is None:
            return self.may_join(room)
        return any(glob_match(p, room) for p in self.publish)


# --------------------------------------------------------------------------- helpers


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{ts:.0f} (unix seconds)"


def _number(payload: dict[str, Any], claim: str) -> float | None:
    """The claim as a finite float, ``None`` when absent; AuthError on a wrong type."""
    if claim not in payload:
        return None
    value = payload[claim]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthError(
            f"token claim {claim!r} must be a number (unix seconds), got {_type_name(value)}"
        )
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise AuthError(f"token claim {claim!r} must be a finite number (unix seconds)")
    return number


def _globs(payload: dict[str, Any], claim: str) -> tuple[str, ...] | None:
    if claim not in payload:
        return None
    value = payload[claim]
    if not isinstance(value, list):
        raise AuthError(
            f"token claim {claim!r} must be a list of room globs (strings), got {_type_name(value)}"
        )
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise AuthError(
                f"token claim {claim!r} must be a list of strings; item {i} is {_type_name(item)}"
            )
    return tuple(value)


def _claims_from_payload(
    payload: dict[str, Any], *, now: float, leeway: float, require_exp: bool
) -> Claims:
    if "sub" not in payload:
        raise AuthError("token has no 'sub' claim; tokens must name the user in 'sub'")
    sub = payload["sub"]
    if not isinstance(sub, str) or not sub:
        raise AuthError(
            f"token claim 'sub' must be a non-empty string, got "
            f"{'an empty string' if sub == '' else _type_name(sub)}"
        )

    exp = _number(payload, "exp")
    if exp is None and require_exp:
        raise AuthError("token has no 'exp' claim; this server only accepts tokens that expire")
    if exp is not None and exp <= now - leeway:
        raise AuthError(f"token expired at {_iso(exp)}; {_REFRESH_HINT}", reason="expired")

    nbf = _number(payload, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise AuthError(
            f"token is not valid before {_iso(nbf)} ('nbf'); check the clocks of the token "
            "issuer and the server, or use a token without 'nbf'",
            reason="not_yet_valid",
        )
    _number(payload, "iat")  # type check only: issuer clocks drift, 'exp' is what counts

    rooms = _globs(payload, "rooms")
    publish = _globs(payload, "publish")

    name = payload.get("name")
    if "name" in payload and not isinstance(name, str):
        raise AuthError(f"token claim 'name' must be a string, got {_type_name(name)}")

    send = payload.get("send")
    if "send" in payload and not isinstance(send, bool):
        raise AuthError(f"token claim 'send' must be true or false, got {_type_name(send)}")

    return Claims(sub=sub, exp=exp, rooms=rooms, publish=publish, name=name, send=send)


# --------------------------------------------------------------------------- verifier


_PYJWT_ALGORITHMS = get_default_algorithms()
# Header "alg" values that are echoed in messages; anything else is attacker text and is not.
_KNOWN_JWA = frozenset(SUPPORTED_ALGORITHMS) | frozenset(_PYJWT_ALGORITHMS) | {"ES256K", "EdDSA"}

# Time-based checks use the injected clock, so PyJWT's (wall-clock) ones are off.
_DECODE_OPTIONS: dict[str, Any] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": True,  # refuse tokens restricted to an audience: we are not configured as one
    "verify_iss": False,
    "verify_sub": False,  # checked here, with a better message
    "verify_jti": False,
    "require": [],
}


def _normalize_algorithms(algorithms: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(algorithms, str):
        algorithms = (algorithms,)
    names: list[str] = []
    by_upper = {a.upper(): a for a in SUPPORTED_ALGORITHMS}
    for raw in algorithms:
        if not isinstance(raw, str):
            raise ValueError(f"algorithm names must be strings, got {type(raw).__name__}")
        if raw.strip().lower() == "none":
            raise ValueError("algorithm 'none' (unsigned tokens) is never accepted")
        name = by_upper.get(raw.strip().upper())
        if name is None:
            raise ValueError(
                f"unknown token algorithm {raw!r}; use one of {', '.join(SUPPORTED_ALGORITHMS)}"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("no token algorithm configured; use ('HS256',) with a secret")
    return tuple(names)


class TokenVerifier:
    """Verifies hub tokens and turns them into :class:`Claims`.

    ``TokenVerifier(secret=S)`` accepts HS256 tokens signed with ``S`` -- the default and
    what ``wirehub token`` mints.  Asymmetric algorithms need both ``public_key`` (PEM, or an
    ``ssh-rsa`` / ``ecdsa-sha2-*`` line) and the algorithm listed, e.g.
    ``TokenVerifier(public_key=pem, algorithms=["RS256"])``.  Families may be mixed
    (``algorithms=["HS256", "RS256"]`` with both a secret and a public key); the key is chosen
    by the token's algorithm, never by the token, so an HS256 token "signed" with the public
    key is checked against the secret and refused.  A token whose header ``alg`` is not listed
    (``none`` included) is refused before any signature check.

    Raises :class:`ValueError` at construction for contradictory configuration: an HMAC
    algorithm without a secret, an asymmetric one without a public key, key material that
    no listed algorithm uses, a key of the wrong type or curve, a private key given as
    ``public_key``, an unknown algorithm or ``none``, a negative leeway.

    ``leeway`` (seconds) tolerates clock skew for ``exp`` and ``nbf``.  ``clock`` returns unix
    seconds (``time.time`` by default; tests inject their own).
    """

    __slots__ = ("_algorithms", "_keys", "_leeway", "_require_exp", "_clock", "_quiet_short_key")

    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: str | bytes | None = None,
        algorithms: Sequence[str] = ("HS256",),
        leeway: float = 0,
        require_exp: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        algs = _normalize_algorithms(algorithms)
        hmac_algs = [a for a in algs if a in _HMAC]
        asym_algs = [a for a in algs if a in _ASYMMETRIC]

        if isinstance(leeway, bool) or not isinstance(leeway, (int, float)):
            raise ValueError(f"leeway must be a number of seconds, got {type(leeway).__name__}")
        if not math.isfinite(leeway) or leeway < 0:
            raise ValueError(f"leeway must be a finite number of seconds >= 0, got {leeway!r}")
        if not callable(clock):
            raise ValueError("clock must be a callable returning unix seconds")

        if asym_algs and (public_key is None or public_key in ("", b"")):
            raise ValueError(
                f"{'/'.join(asym_algs)} needs a public key (PEM); configure one or use HS256 "
                "with a secret"
            )

        keys: dict[str, Any] = {}
        quiet = False

        if hmac_algs:
            if secret is None or secret == "":
                raise ValueError(
                    f"{'/'.join(hmac_algs)} needs a secret; configure one (--secret) or list "
                    "only RS256/ES256 with a public key"
                )
            if not isinstance(secret, str):
                raise ValueError(f"secret must be a string, got {type(secret).__name__}")
            short: list[tuple[str, int]] = []
            for alg in hmac_algs:
                algo = _PYJWT_ALGORITHMS[alg]
                try:
                    prepared = algo.prepare_key(secret)
                except jwt.InvalidKeyError:
                    raise ValueError(
                        "the secret looks like a PEM/SSH/DER key; an asymmetric key must not be "
                        "used as an HMAC secret -- pass it as public_key with RS256/ES256"
                    ) from None
                if algo.check_key_length(prepared) is not None:
                    short.append((alg, algo.hash_alg().digest_size))
                keys[alg] = prepared
            if short:
                # Warn once here; PyJWT's per-token warning is silenced in verify().
                quiet = True
                alg, need = max(short, key=lambda item: item[1])
                warnings.warn(
                    f"the token secret is {len(secret.encode())} bytes long; use at least {need} "
                    f"random bytes for {alg} (e.g. `python -c 'import secrets; "
                    "print(secrets.token_urlsafe(48))'`)",
                    UserWarning,
                    stacklevel=2,
                )

        if asym_algs:
            if not isinstance(public_key, (str, bytes)):
                raise ValueError(f"public_key must be PEM text, got {type(public_key).__name__}")
            for alg in asym_algs:
                try:
                    prepared = _PYJWT_ALGORITHMS[alg].prepare_key(public_key)
                except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
                    raise ValueError(
                        f"public_key is not a usable {alg} public key ({_key_problem(exc)})"
                    ) from None
                except Exception:  # cryptography's UnsupportedAlgorithm and friends
                    raise ValueError(f"public_key is not a usable {alg} public key") from None
                if hasattr(prepared, "private_numbers"):
                    raise ValueError(
                        "public_key is a private key; give the server only the public key "
                        "(e.g. `openssl pkey -in key.pem -pubout`)"
                    )
                keys[alg] = prepared
        if secret is not None and not hmac_algs:
            raise ValueError(
                f"a secret is configured but no HMAC algorithm is listed (algorithms: "
                f"{', '.join(algs)}); add 'HS256' to algorithms or drop the secret"
            )
        if not asym_algs and public_key is not None:
            raise ValueError(
                f"a public key is configured but no RS/PS/ES algorithm is listed (algorithms: "
                f"{', '.join(algs)}); add e.g. 'RS256' or 'ES256' to algorithms or drop the key"
            )

        self._algorithms = algs
        self._keys = keys
        self._leeway = float(leeway)
        self._require_exp = bool(require_exp)
        self._clock = clock
        self._quiet_short_key = quiet

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The accepted algorithms, in configured order."""
        return self._algorithms

    def __repr__(self) -> str:  # never shows key material
        algs = list(getattr(self, "_algorithms", ()))
        leeway = getattr(self, "_leeway", None)
        require_exp = getattr(self, "_require_exp", None)
        return f"TokenVerifier(algorithms={algs!r}, leeway={leeway!r}, require_exp={require_exp!r})"

    def verify(self, token: str) -> Claims:
        """Check ``token`` and return its claims; raise :class:`AuthError` if it is refused."""
        if token is None or token == "":
            raise AuthError(
                'missing token; send {"op":"hello","token":T} with a token from your auth '
                "service (or `wirehub token`)",
                reason="missing",
            )
        if not isinstance(token, str):
            raise AuthError(f"token must be a string (a JWT), got {_type_name(token)}", reason="malformed")

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError(_NOT_A_JWT, reason="malformed") from None
        except (ValueError, TypeError, UnicodeError):
            raise AuthError(_NOT_A_JWT, reason="malformed") from None

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._keys:
            if alg is None:
                raise AuthError("token header has no 'alg'; it is not a signed JWT", reason="algorithm")
            known = isinstance(alg, str) and (alg in _KNOWN_JWA or alg.lower() == "none")
            shown = f"{alg!r} " if known else ""
            raise AuthError(
                f"token algorithm {shown}is not accepted; this server accepts "
                f"{', '.join(self._algorithms)}",
                reason="algorithm",
            )

        try:
            if self._quiet_short_key:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                    payload = self._decode(token, alg)
            else:
                payload = self._decode(token, alg)
        except jwt.InvalidSignatureError:
            what = "secret" if alg in _HMAC else "public key"
            raise AuthError(
                f"token signature does not match the server's {what}; get a token signed by "
                "this server's issuer",
                reason="signature",
            ) from None
        except jwt.ExpiredSignatureError:  # not raised with our options; kept as a safety net
            raise AuthError(f"token expired; {_REFRESH_HINT}", reason="expired") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(
                f"token algorithm is not accepted; this server accepts {', '.join(self._algorithms)}",
                reason="algorithm",
            ) from None
        except jwt.InvalidAudienceError:
            raise AuthError(
                "token is restricted to an audience ('aud') and this server is not one; "
                "mint hub tokens without 'aud'"
            ) from None
        except jwt.DecodeError:
            raise AuthError(_NOT_A_JWT, reason="malformed") from None
        except jwt.InvalidKeyError:
            raise AuthError(
                f"token could not be checked with the server's {alg} key; get a token signed "
                "by this server's issuer",
                reason="signature",
            ) from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"token is invalid: {type(exc).__name__}", reason="invalid") from None
        except (ValueError, TypeError, UnicodeError, OverflowError):
            raise AuthError(_NOT_A_JWT, reason="malformed") from None

        if not isinstance(payload, dict):  # pragma: no cover - PyJWT guarantees an object
            raise AuthError(_NOT_A_JWT, reason="malformed")
        return _claims_from_payload(
            payload, now=self._clock(), leeway=self._leeway, require_exp=self._require_exp
        )

    def _decode(self, token: str, alg: str) -> dict[str, Any]:
        return jwt.decode(token, self._keys[alg], algorithms=[alg], options=_DECODE_OPTIONS)

    def expires_in(self, claims: Claims) -> float | None:
        """Seconds until ``claims.exp`` by this verifier's clock (negative once past; leeway not added).

        ``None`` for a token without ``exp``.
        """
        if claims.exp is None:
            return None
        return claims.exp - self._clock()


_NOT_A_JWT = "token is not a valid JWT (expected header.payload.signature in base64url)"


def _key_problem(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# --------------------------------------------------------------------------- minting


def mint_token(
    secret: str,
    sub: str,
    *,
    rooms: Sequence[str] | None = None,
    publish: Sequence[str] | None = None,
    ttl: float | None = 3600,
    name: str | None = None,
    send: bool | None = None,
    clock: Callable[[], float] = time.time,
) -> str:
    """An HS256 token for ``sub`` signed with ``secret`` (what ``wirehub token`` prints).

    ``rooms`` / ``publish`` of ``None`` leave the claim out (any room / follow ``rooms``);
    an empty sequence grants nothing.  ``send`` of ``None`` leaves its claim out (direct
    messages allowed only without ``rooms``).  ``ttl`` of ``None`` mints a token without ``exp``
    (only accepted by a verifier with ``require_exp=False``).  ``iat`` and ``exp`` are whole
    seconds (``exp`` rounded up, so the token lives at least ``ttl``).
    Raises :class:`ValueError` for bad arguments.
    """
    if not isinstance(secret, str) or not secret:
        raise ValueError("secret must be a non-empty string")
    if not isinstance(sub, str) or not sub:
        raise ValueError("sub must be a non-empty string (the user id)")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"name must be a string, got {type(name).__name__}")
    if send is not None and not isinstance(send, bool):
        raise ValueError(f"send must be True, False or None, got {type(send).__name__}")

    now = clock()
    payload: dict[str, Any] = {"sub": sub, "iat": int(now)}
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
            raise ValueError(f"ttl must be a number of seconds or None, got {type(ttl).__name__}")
        if not math.isfinite(ttl) or ttl <= 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        payload["exp"] = math.ceil(now + ttl)
    for claim, globs in (("rooms", rooms), ("publish", publish)):
        if globs is None:
            continue
        if isinstance(globs, (str, bytes)):
            raise ValueError(f"{claim} must be a list of globs, not a single string")
        items = list(globs)
        for item in items:
            if not isinstance(item, str):
                raise ValueError(f"{claim} must contain only strings, got {type(item).__name__}")
        payload[claim] = items
    if name is not None:
        payload["name"] = name
    if send is not None:
        payload["send"] = send

    try:
        return jwt.encode(payload, secret, algorithm="HS256")
    except jwt.InvalidKeyError:
        raise ValueError(
            "the secret looks like a PEM/SSH/DER key; an asymmetric key must not be used "
            "as an HMAC secret"
        ) from None
