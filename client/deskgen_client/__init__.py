"""The deskgen API client: :class:`Deskgen` (blocking) and :class:`AsyncDeskgen` (asyncio) on httpx.

>>> from deskgen_client import Deskgen, NotADesk, Step
>>> with Deskgen() as client:                      # $DESKGEN_URL, $DESKGEN_API_KEY
...     try:
...         result = client.generate("desk.jpg", mix="ott_3d", seed=42,
...                                  on_event=lambda e: isinstance(e, Step) and print(e.step, e.total))
...     except NotADesk as error:
...         print("not a desk:", error.score)
...     else:
...         result.save("out.png")
...         client.feedback(result.image_id, "like")
...     located = client.locate("out.png", ["monitor", "keyboard"])
...     located.products.found("monitor"), located.products.boxes("monitor")

Both clients build every request and read every answer through one core (:mod:`.core`); the requests,
answers and events are the API's own models (:mod:`.protocol`, shared with the server, with the fixed
rules of :mod:`.rules`), typed errors are in :mod:`.errors`, the retry rule in :mod:`.retry`. The command
line is :mod:`.cli` (``deskgen``); docs/CLIENT.md has the guide. This distribution needs httpx and
pydantic, nothing heavy.
"""

from deskgen_client.aio import AsyncDeskgen
from deskgen_client.core import DEFAULT_URL, GenerateKwargs, GenerationKwargs, Photo
from deskgen_client.errors import (
    Conflict,
    DeadlineExceeded,
    DeskgenConnectionError,
    DeskgenError,
    Forbidden,
    IdempotencyKeyReused,
    InvalidRequest,
    NotADesk,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimit,
    RateLimited,
    ServerError,
    Unauthorized,
    UnsupportedMediaType,
)
from deskgen_client.jobs import JobEvent
from deskgen_client.protocol import (
    Caption,
    Captioned,
    Classification,
    Classified,
    Concepts,
    Done,
    ExperimentList,
    FeedbackResult,
    GenerationResult,
    Health,
    Keyword,
    Limits,
    Located,
    LocatedProduct,
    LocateResult,
    Mixes,
    MixInfo,
    NamedMix,
    OtherEvent,
    ProductBox,
    ProductLocation,
    ProgressEvent,
    Readiness,
    Started,
    Step,
)
from deskgen_client.retry import RetryPolicy
from deskgen_client.sync import Deskgen, Jobs

__all__ = [
    "DEFAULT_URL",
    "AsyncDeskgen",
    "Caption",
    "Captioned",
    "Classification",
    "Classified",
    "Concepts",
    "Conflict",
    "DeadlineExceeded",
    "Deskgen",
    "DeskgenConnectionError",
    "DeskgenError",
    "Done",
    "ExperimentList",
    "FeedbackResult",
    "Forbidden",
    "GenerateKwargs",
    "GenerationKwargs",
    "GenerationResult",
    "Health",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "JobEvent",
    "Jobs",
    "Keyword",
    "Limits",
    "LocateResult",
    "Located",
    "LocatedProduct",
    "MixInfo",
    "Mixes",
    "NamedMix",
    "NotADesk",
    "NotFound",
    "OtherEvent",
    "Overloaded",
    "PayloadTooLarge",
    "Photo",
    "ProductBox",
    "ProductLocation",
    "ProgressEvent",
    "RateLimit",
    "RateLimited",
    "Readiness",
    "RetryPolicy",
    "ServerError",
    "Started",
    "Step",
    "Unauthorized",
    "UnsupportedMediaType",
]
