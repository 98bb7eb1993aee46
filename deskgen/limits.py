"""Every limit a request is checked against, in one place.

The ingress's ``user_config`` may change the request limits (:class:`RequestLimits`) with ``serve deploy``;
the generator checks each request against the limits the ingress sent with it
(:class:`deskgen.contracts.GenerationRequest`), so a limit raised in serve_config.yaml is raised
everywhere at once. The constants below are the bounds no configuration can move (the range of a
seed, the guidance a scheduler accepts); the dataclass defaults are production's.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A seed is a 32-bit unsigned integer (torch.Generator accepts more; clients and PNG metadata do not).
MAX_SEED = 2**32 - 1
#: Characters in a prompt or a negative prompt (the text encoders see 77 tokens; longer text is cut).
MAX_PROMPT_CHARS = 2000
#: Classifier-free guidance scale.
MIN_GUIDANCE = 0.0
MAX_GUIDANCE = 30.0
#: Characters in a style concept woven into the prompt, and in a user id.
MAX_STYLE_CHARS = 200
MAX_USER_ID_CHARS = 200
#: A prompt, or a style, with a concept preset's fragment (at most MAX_STYLE_CHARS) woven in: the bounds the
#: generator and the prompt builder check (the request's own text is held to the bounds above).
MAX_WOVEN_PROMPT_CHARS = MAX_PROMPT_CHARS + MAX_STYLE_CHARS + 2
MAX_WOVEN_STYLE_CHARS = 2 * MAX_STYLE_CHARS + 2
#: A request id (the ``X-Request-Id`` a client may send; it is also the image id feedback names).
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
#: Characters in a mix specification (`adapter:weight+...`).
MAX_MIX_SPEC_CHARS = 300
#: A request's own deadline (`timeout_s`), seconds.
MAX_TIMEOUT_S = 600.0
#: A request body over its limit is still read and discarded up to this many bytes before the 413 goes
#: out, so that a client that sends its whole body before reading (Python's urllib, curl without
#: ``Expect: 100-continue``) reads the answer instead of a connection reset. A larger body is not read.
MAX_DRAIN_BYTES = 64 * 1024 * 1024
#: A multipart form's parts: the photo plus every option fits well within these.
MAX_FORM_FIELDS = 32
MAX_FORM_FILES = 2
#: How deeply a JSON body may nest (a bound far above any real request; deeper is a 400, never a 500).
MAX_JSON_DEPTH = 64
#: The VAE works in 8-pixel cells: image sides are multiples of this.
SIDE_MULTIPLE = 8
#: Conditional caption prefixes the captioner may be configured with, and characters per prefix.
MAX_PREFIXES = 8
MAX_PREFIX_CHARS = 200
#: A LoRA's weight in a mix.
MIN_WEIGHT = 0.0
MAX_WEIGHT = 2.0
#: Products a request may ask the locator to find, and characters per product name (the detector's text
#: encoder sees 16 tokens of "a photo of a <product>"; longer names are cut there).
MAX_PRODUCTS = 16
MAX_PRODUCT_CHARS = 48
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
