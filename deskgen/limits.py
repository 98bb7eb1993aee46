"""Every limit a request is checked against, in one place.

The ingress's ``user_config`` may change the request limits (:class:`RequestLimits`) with ``serve deploy``;
the generator checks each request against the limits the ingress sent with it
(:class:`deskgen.contracts.GenerationRequest`), so a limit raised in serve_config.yaml is raised
everywhere at once. The bounds no configuration can move that a client sees (the range of a seed, the
guidance a scheduler accepts, the lengths of texts) are the protocol's: they live in
:mod:`deskgen_client.rules` and are re-exported here; the ones below are the server's own. The
dataclass defaults are production's.
"""

from __future__ import annotations

from dataclasses import dataclass

from deskgen_client.rules import (
    MAX_GUIDANCE,
    MAX_MIX_SPEC_CHARS,
    MAX_PRODUCT_CHARS,
    MAX_PRODUCTS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STYLE_CHARS,
    MAX_TIMEOUT_S,
    MAX_USER_ID_CHARS,
    MIN_GUIDANCE,
    REQUEST_ID_PATTERN,
    SIDE_MULTIPLE,
)

__all__ = [
    "DEFAULT_SIZE_LIMITS",
    "DEFAULT_UPLOAD_LIMITS",
    "MAX_DRAIN_BYTES",
    "MAX_FORM_FIELDS",
    "MAX_FORM_FILES",
    "MAX_GUIDANCE",
    "MAX_INSTANCES",
    "MAX_JSON_DEPTH",
    "MAX_MIX_SPEC_CHARS",
    "MAX_PREFIXES",
    "MAX_PREFIX_CHARS",
    "MAX_PRODUCTS",
    "MAX_PRODUCT_CHARS",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "MAX_STYLE_CHARS",
    "MAX_TIMEOUT_S",
    "MAX_USER_ID_CHARS",
    "MAX_WEIGHT",
    "MAX_WOVEN_PROMPT_CHARS",
    "MAX_WOVEN_STYLE_CHARS",
    "MIN_GUIDANCE",
    "MIN_WEIGHT",
    "REQUEST_ID_PATTERN",
    "SIDE_MULTIPLE",
    "UNHEALTHY_AFTER_FAILURES",
    "SizeLimits",
    "UploadLimits",
]

#: A prompt, or a style, with a concept preset's fragment (at most MAX_STYLE_CHARS) woven in: the bounds the
#: generator and the prompt builder check (the request's own text is held to the bounds above).
MAX_WOVEN_PROMPT_CHARS = MAX_PROMPT_CHARS + MAX_STYLE_CHARS + 2
MAX_WOVEN_STYLE_CHARS = 2 * MAX_STYLE_CHARS + 2
#: A request body over its limit is still read and discarded up to this many bytes before the 413 goes
#: out, so that a client that sends its whole body before reading (Python's urllib, curl without
#: ``Expect: 100-continue``) reads the answer instead of a connection reset. A larger body is not read.
MAX_DRAIN_BYTES = 64 * 1024 * 1024
#: A multipart form's parts: the photo plus every option fits well within these.
MAX_FORM_FIELDS = 32
MAX_FORM_FILES = 2
#: How deeply a JSON body may nest (a bound far above any real request; deeper is a 400, never a 500).
MAX_JSON_DEPTH = 64
#: Conditional caption prefixes the captioner may be configured with, and characters per prefix.
MAX_PREFIXES = 8
MAX_PREFIX_CHARS = 200
#: A LoRA's weight in a mix.
MIN_WEIGHT = 0.0
MAX_WEIGHT = 2.0
#: Instances of one product the locator reports (two monitors, three plants), at most.
MAX_INSTANCES = 16
#: Unexpected model failures in a row (failed batches, failed generations) after which a replica's
#: ``check_health`` reports it broken, so Serve replaces it. Bad requests do not count.
UNHEALTHY_AFTER_FAILURES = 3

@dataclass(frozen=True)
class SizeLimits:
    """Bounds on the image side (pixels, inclusive) and on the number of denoising steps."""

    min_side: int = 64
    max_side: int = 2048
    max_steps: int = 150

@dataclass(frozen=True)
class UploadLimits:
    """Bounds on an uploaded photo: bytes on the wire, pixels once decoded."""

    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000

DEFAULT_SIZE_LIMITS = SizeLimits()
DEFAULT_UPLOAD_LIMITS = UploadLimits()
