"""The events of a streamed generation (``Accept: text/event-stream``), in the order they come:
``classified`` and ``captioned`` (from a photo only), ``started``, a ``step`` per denoising step,
``located``, then ``done`` with the JSON answer, or ``error`` with the JSON error and its ``status``.

Each event's ``data`` is the JSON of its model (``located``: a :class:`ProductLocation`; ``done``: a
:class:`GenerationResult`). The server writes the events from these models; :func:`read_event` reads one.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from deskgen_client.protocol.answers import Answer, GenerationResult, Keyword, ProductLocation


class Classified(Answer):
    """The gate passed the photo."""

    score: float
    threshold: float


class Captioned(Answer):
    """The captions, ranked objects and the prompt built from them."""

    captions: dict[str, Any]
    keywords: tuple[Keyword, ...] = ()
    prompt: str


class Started(Answer):
    """A generator replica holds the mix and starts denoising (after ``queued_s`` in its queue)."""

    mix_id: str
    replica: str
    queued_s: float


class Step(Answer):
    """Denoising step ``step`` of ``total`` is done (``step`` counts from 1)."""

    step: int
    total: int


class Located(BaseModel):
    """The products were looked for in the generated image (just before ``Done``, whose result carries the
    same ``products``). Its ``data`` on the wire is the :class:`ProductLocation` itself."""

    model_config = ConfigDict(frozen=True)

    products: ProductLocation

    def __init__(self, products: ProductLocation | None = None, /, **data: Any) -> None:
        super().__init__(**({"products": products} if products is not None else {}), **data)


class Done(BaseModel):
    """The image: the last event of a stream that succeeded. Its ``data`` is the result itself."""

    model_config = ConfigDict(frozen=True)

    result: GenerationResult

    def __init__(self, result: GenerationResult | None = None, /, **data: Any) -> None:
        super().__init__(**({"result": result} if result is not None else {}), **data)


class OtherEvent(BaseModel):
    """An event this client does not know (a newer server); passed on, not dropped."""

    model_config = ConfigDict(frozen=True)

    event: str
    data: Any

    def __init__(self, event: str | None = None, data: Any = None, /, **fields: Any) -> None:
        given = {"event": event, "data": data} if event is not None else {}
        super().__init__(**given, **fields)


ProgressEvent = Classified | Captioned | Started | Step | Located | Done | OtherEvent

#: Event name -> the model of its data, for the events whose data is their model.
EVENTS: dict[str, type[Answer]] = {"classified": Classified, "captioned": Captioned, "started": Started, "step": Step}


def read_event(name: str, data: Any) -> ProgressEvent:
    """The typed event of one ``event: name`` / ``data: <json>`` pair (``error`` is not an event here:
    the client raises it)."""
    if name in EVENTS:
        return EVENTS[name].model_validate(data)  # type: ignore[return-value]
    if name == "located":
        return Located(products=ProductLocation.model_validate(data))
    if name == "done":
        return Done(result=GenerationResult.model_validate(data))
    return OtherEvent(event=name, data=data)


def event_data(event: ProgressEvent) -> Any:
    """What an event's ``data`` holds on the wire (the inverse of :func:`read_event`)."""
    if isinstance(event, Located):
        return event.products.model_dump(mode="json")
    if isinstance(event, Done):
        return event.result.model_dump(mode="json", exclude_unset=True)
    if isinstance(event, OtherEvent):
        return event.data
    return event.model_dump(mode="json")


def event_name(event: ProgressEvent) -> str:
    if isinstance(event, Located):
        return "located"
    if isinstance(event, Done):
        return "done"
    if isinstance(event, OtherEvent):
        return event.event
    return next(name for name, model in EVENTS.items() if isinstance(event, model))
