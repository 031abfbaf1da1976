"""TLS server contexts: TLS 1.2 minimum, optional client certificates (mutual TLS)."""

from __future__ import annotations

import ssl


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """Build the context every TLS and WSS listener shares."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
