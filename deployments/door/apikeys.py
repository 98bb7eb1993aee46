"""API keys: configured as SHA-256 hashes (the key itself is never stored, logged or echoed), presented
as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

Keys are random 256-bit tokens minted by ``python -m deployments.door.apikeys NAME``, so an unsalted SHA-256 is
enough (there is nothing to brute-force, unlike a password) and lets the key ring look a key up in one
dict access. Each key carries its limits (:class:`KeyLimits`); the ingress's ``user_config`` lists them,
so a key is added or revoked with ``serve deploy`` (no restart).
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

#: Minted keys start with this, so a leaked one is recognisable in a secret scanner.
KEY_PREFIX = "dg_"
KEY_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
WEBHOOK_SECRET_PATTERN = r"^whsec_[A-Za-z0-9+/]{32,88}={0,2}$"


class KeyLimits(BaseModel):
    """Per-key limits; ``None`` means unlimited."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: float | None = Field(
        None, gt=0, description="sustained rate of requests (every authenticated route counts)"
    )
    burst: int | None = Field(
        None, ge=1, description="requests that may arrive at once (the bucket's size); default: one minute's worth"
    )
    max_concurrent: int | None = Field(None, ge=1, description="generations (/v1/generate, /v1/text2img) in flight at once")


class ApiKey(KeyLimits):
    """One key in ``user_config.api_keys``: a name (logs and metrics show it; the key never), the hash."""

    name: str = Field(..., pattern=KEY_NAME_PATTERN)
    sha256: str = Field(..., pattern=SHA256_PATTERN, description="hex SHA-256 of the key (python -m deployments.door.apikeys)")
    webhook_secret: str | None = Field(
        None, pattern=WEBHOOK_SECRET_PATTERN,
        description="signs the webhooks of this key's jobs (Standard Webhooks: whsec_ + base64 of 24-64 random "
        "bytes); give it to the key's owner with the key",
    )  # fmt: skip


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>`` first, else ``X-API-Key``."""
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None


class KeyRing:
    """The configured keys by hash. Empty = the API is open (``make serve``'s default)."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.by_hash = {k.sha256: k for k in keys}

    def __bool__(self) -> bool:
        return bool(self.by_hash)

    def lookup(self, key: str) -> ApiKey | None:
        return self.by_hash.get(key_hash(key))


def mint() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Mint an API key: prints the key (give it to the client, once) and the serve_config.yaml "
        "entry with its hash (the only thing the server keeps)."
    )
    parser.add_argument("name", help="what the key is for (shown in logs and metrics), e.g. backend")
    parser.add_argument("--rpm", type=float, default=None, help="requests per minute (default: unlimited)")
    parser.add_argument("--concurrent", type=int, default=None, help="concurrent generations (default: unlimited)")
    parser.add_argument("--no-webhook-secret", action="store_true",
                        help="mint no webhook signing secret (the key's jobs then cannot ask for webhooks)")
    args = parser.parse_args(argv)
    entry = ApiKey(name=args.name, sha256="0" * 64, requests_per_minute=args.rpm, max_concurrent=args.concurrent)
    key = mint()
    print(f"key (give to the client; it is not stored anywhere): {key}")
    print("serve_config.yaml, Ingress user_config.api_keys:")
    print(f"  - {{name: {entry.name}, sha256: {key_hash(key)}", end="")
    if entry.requests_per_minute is not None:
        print(f", requests_per_minute: {entry.requests_per_minute:g}", end="")
    if entry.max_concurrent is not None:
        print(f", max_concurrent: {entry.max_concurrent}", end="")
    if not args.no_webhook_secret:
        from deskgen_client.webhooks import new_secret

        secret = new_secret()
        print(f", webhook_secret: {secret}", end="")
    print("}")
    if not args.no_webhook_secret:
        print(f"webhook signing secret (give to the client with the key; it verifies the job webhooks): {secret}")


if __name__ == "__main__":
    main()
