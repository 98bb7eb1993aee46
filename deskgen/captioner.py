"""The captioning stage: BLIP captions of a desk photo, one unconditional and one per conditional prefix.

Ray-free on purpose: ``deployments/captioner.py`` wraps a :class:`Captioner` and adds batching and
``user_config``; unit tests drive this class directly on the tiny BLIP (``deskgen.tools.tiny_blip``).

How a batch is captioned (``caption_batch``):
  1. Every image goes through :func:`deskgen.images.to_rgb` and BLIP's image processor (the PIL backend,
     chosen explicitly: torchvision is optional and the two resize implementations differ slightly).
  2. The vision encoder runs ONCE per image. ``BlipForConditionalGeneration.generate`` would re-encode
     the image for every prompt. Measured on BLIP-base (CPU, fp32, one thread, 20 new tokens): the vision
     pass is ~1.4 s of a ~3.0 s caption, and the four prompts took ~7.5 s instead of ~12.3 s.
  3. The text decoder runs once per prompt (the unconditional one, then each prefix in order), batched
     across images, greedy (``num_beams=1, do_sample=False``): deterministic, and equal to what
     ``model.generate(pixel_values, input_ids, **settings)`` returns (a unit test pins that). Greedy BLIP
     loops ("mouse, and mouse, and mouse"); :class:`DecodeSettings` guards against it: no 3-gram twice
     (``no_repeat_ngram_size``), at most ``max_new_tokens`` tokens, an optional ``repetition_penalty``.
     Their cost against plain greedy is measured by ``python -m bench.captions`` (BENCHMARKS.md).
  4. The decoder's output starts with its prompt (``[DEC]`` + the prefix tokens). That echo is cut off by
     token count after checking the ids match: comparing strings would fail, because the BERT tokenizer
     lower-cases and splits punctuation ("Q: What" comes back as "q : what").
"""

from __future__ import annotations

import logging
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deskgen.devices import placement
from deskgen.errors import InvalidParameter, ModelFilesMissing
from deskgen.images import to_rgb
from deskgen.limits import MAX_PREFIX_CHARS, MAX_PREFIXES
from deskgen.paths import resolve_model_id
from deskgen.prompts.captions import DEFAULT_PREFIXES

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "Salesforce/blip-image-captioning-base"


@dataclass(frozen=True)
class CaptionSet:
    """The captions of one image. ``conditional`` holds ``(prefix, caption)`` pairs in prefix order; each
    caption is the decoder's continuation only, without the echoed prefix."""

    unconditional: str
    conditional: tuple[tuple[str, str], ...]

    def texts(self) -> list[str]:
        """The unconditional caption, then the conditional ones: the input of ``rank_keywords``."""
        return [self.unconditional, *(caption for _, caption in self.conditional)]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (responses, PNG metadata); the list keeps the prefix order."""
        return {
            "unconditional": self.unconditional,
            "conditional": [{"prefix": prefix, "caption": caption} for prefix, caption in self.conditional],
        }


@dataclass(frozen=True)
class _DecoderPrompt:
    """A decoder prompt as ids: ``[DEC]`` followed by the prefix tokens (no ``[SEP]``)."""

    prefix: str | None
    ids: tuple[int, ...]


@dataclass(frozen=True)
class _PrefixState:
    """Swapped as one object, so a caption call running while ``set_prefixes`` runs sees either the old
    or the new prefixes, never a mix."""

    prefixes: tuple[str, ...]
    prompts: tuple[_DecoderPrompt, ...]


def validate_prefixes(prefixes: Sequence[str]) -> tuple[str, ...]:
    """Return the prefixes as a tuple or raise :class:`InvalidParameter` (field ``prefixes``).

    Rules: a list (not one bare string) of at most :data:`MAX_PREFIXES` distinct strings, each non-blank,
    at most :data:`MAX_PREFIX_CHARS` characters, without control characters. An empty list is allowed: the
    captioner then writes only the unconditional caption.
    """
    if isinstance(prefixes, str) or not isinstance(prefixes, Sequence):
        raise InvalidParameter(
            f"`prefixes` must be a list of strings but is {type(prefixes).__name__}: {prefixes!r}.",
            field="prefixes",
        )
    if len(prefixes) > MAX_PREFIXES:
        raise InvalidParameter(
            f"`prefixes` must hold at most {MAX_PREFIXES} prefixes but holds {len(prefixes)}.",
            field="prefixes",
        )
    for i, prefix in enumerate(prefixes):
        if not isinstance(prefix, str):
            raise InvalidParameter(
                f"`prefixes[{i}]` must be a string but is {type(prefix).__name__}: {prefix!r}.",
                field="prefixes",
            )
        if not prefix.strip():
            raise InvalidParameter(f"`prefixes[{i}]` must be non-blank but is {prefix!r}.", field="prefixes")
        if len(prefix) > MAX_PREFIX_CHARS:
            raise InvalidParameter(
                f"`prefixes[{i}]` must be at most {MAX_PREFIX_CHARS} characters but is {len(prefix)}: "
                f"{prefix[:40]!r}...",
                field="prefixes",
            )
        if any(unicodedata.category(ch).startswith("C") for ch in prefix):
            raise InvalidParameter(
                f"`prefixes[{i}]` must not contain control characters but is {prefix!r}.", field="prefixes"
            )
    if len(set(prefixes)) != len(prefixes):
        raise InvalidParameter(f"`prefixes` must be distinct but are {list(prefixes)!r}.", field="prefixes")
    return tuple(prefixes)


def _check_max_new_tokens(max_new_tokens: int) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidParameter(
            f"`max_new_tokens` must be an integer >= 1 but is {max_new_tokens!r}.", field="max_new_tokens"
        )
    return max_new_tokens


#: BLIP-base's captions are ~8-15 tokens; 30 leaves room for an object list and bounds a loop.
DEFAULT_MAX_NEW_TOKENS = 30
#: No 3-gram twice: stops "a monitor and a monitor" / "mouse, and mouse," loops, keeps "a ... a ...".
DEFAULT_NO_REPEAT_NGRAM_SIZE = 3
#: 1.0 = off. Penalising every seen token also penalises the prefix's words ("desk"), so it is opt-in.
DEFAULT_REPETITION_PENALTY = 1.0
MAX_NO_REPEAT_NGRAM_SIZE = 10
MAX_REPETITION_PENALTY = 2.0


@dataclass(frozen=True)
class DecodeSettings:
    """How the text decoder decodes; always greedy (deterministic). Validated on construction
    (:class:`InvalidParameter` naming the field); swapped as one object by :meth:`Captioner.set_decoding`."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    #: 0 = off; n >= 2: no n-gram (prompt included) appears twice in a caption.
    no_repeat_ngram_size: int = DEFAULT_NO_REPEAT_NGRAM_SIZE
    #: 1.0 = off; > 1 divides the logit of every token already in the sequence (CTRL's penalty).
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY

    def __post_init__(self) -> None:
        _check_max_new_tokens(self.max_new_tokens)
        n = self.no_repeat_ngram_size
        if isinstance(n, bool) or not isinstance(n, int) or n == 1 or not 0 <= n <= MAX_NO_REPEAT_NGRAM_SIZE:
            # 1 would forbid any token twice: "a desk with a lamp" could not be written.
            raise InvalidParameter(
                f"`no_repeat_ngram_size` must be 0 (off) or an integer in 2..{MAX_NO_REPEAT_NGRAM_SIZE} but is {n!r}.",
                field="no_repeat_ngram_size",
            )
        penalty = self.repetition_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, int | float) or not 1.0 <= penalty <= MAX_REPETITION_PENALTY:
            raise InvalidParameter(
                f"`repetition_penalty` must be a number in [1.0, {MAX_REPETITION_PENALTY}] (1.0 = off) but is {penalty!r}.",
                field="repetition_penalty",
            )

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``generate`` (greedy; the guards only when on)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": 1, "do_sample": False}
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = float(self.repetition_penalty)
        return kwargs


class Captioner:
    """BLIP captioning of desk photos.

    Responsibilities: hold a ``BlipForConditionalGeneration`` and its processor on one device; validate
    and tokenize the conditional prefixes (changeable at run time with :meth:`set_prefixes`); caption
    one image or a batch with deterministic greedy decoding guarded against loops (:class:`DecodeSettings`,
    changeable with :meth:`set_decoding`); return captions without echoed prefixes.

    Concurrency: caption calls only read the model; the prefix state is replaced atomically. Calls from
    several threads are safe, but they compete for the same cores or GPU.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        device: str,
        prefixes: Sequence[str] = DEFAULT_PREFIXES,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        no_repeat_ngram_size: int = DEFAULT_NO_REPEAT_NGRAM_SIZE,
        repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    ) -> None:
        """``model``: a ``BlipForConditionalGeneration``; ``processor``: a ``BlipProcessor`` (image
        processor + BERT tokenizer whose [SEP]/[PAD] ids match the model's text config)."""
        import torch

        self.device = str(torch.device(device))
        self._model = model.to(self.device).eval()
        self._dtype: torch.dtype = next(self._model.parameters()).dtype
        self._image_processor = processor.image_processor
        self._tokenizer = processor.tokenizer
        text_config = self._model.config.text_config
        self._bos_id: int = text_config.bos_token_id
        self._sep_id: int = text_config.sep_token_id
        self._pad_id: int = text_config.pad_token_id
        self._max_positions: int = text_config.max_position_embeddings
        for name, expected in (("sep", self._sep_id), ("pad", self._pad_id)):
            actual = getattr(self._tokenizer, f"{name}_token_id")
            if actual != expected:
                raise ValueError(
                    f"tokenizer {name} id {actual} differs from the model's text_config.{name}_token_id "
                    f"{expected}: the processor and the model come from different checkpoints."
                )
        decoding = DecodeSettings(max_new_tokens, no_repeat_ngram_size, repetition_penalty)
        self._unconditional = _DecoderPrompt(prefix=None, ids=(self._bos_id,))
        self._check_length(self._unconditional, decoding.max_new_tokens, field="max_new_tokens")
        # Prefixes and decode settings are swapped as ONE tuple: a caption call sees old or new, never a mix
        # (a longer prefix with an older, larger max_new_tokens could overflow the decoder's positions).
        self._current: tuple[_PrefixState, DecodeSettings] = (
            self._encode(validate_prefixes(prefixes), decoding.max_new_tokens),
            decoding,
        )

    @classmethod
    def from_pretrained(
        cls,
        model_id: str = DEFAULT_MODEL_ID,
        *,
        device: str | None = None,
        dtype: str | None = None,
        prefixes: Sequence[str] = DEFAULT_PREFIXES,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        no_repeat_ngram_size: int = DEFAULT_NO_REPEAT_NGRAM_SIZE,
        repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
    ) -> Captioner:
        """Load a BLIP captioning checkpoint: a hub id, or a local folder (relative paths are resolved
        against the project root, see :func:`deskgen.paths.resolve_model_id`).

        Defaults: ``cuda`` + ``float16`` where a GPU is available, ``cpu`` + ``float32`` otherwise.
        Raises :class:`ModelFilesMissing` naming the path when a local folder does not exist or lacks the
        model files, or when a hub id is neither cached nor downloadable; :class:`InvalidParameter` for an
        unknown ``dtype`` or an unavailable ``device``.
        """
        from transformers import (
            AutoTokenizer,
            BlipForConditionalGeneration,
            BlipImageProcessorPil,
            BlipProcessor,
        )

        location = resolve_model_id(model_id)
        is_local = Path(location).is_absolute()
        if is_local and not Path(location).is_dir():
            raise ModelFilesMissing("BLIP captioner model", location)
        device, torch_dtype = placement(device, dtype)
        # Cheap checks before the expensive load (the position limit needs the model's config).
        validate_prefixes(prefixes)
        DecodeSettings(max_new_tokens, no_repeat_ngram_size, repetition_penalty)

        start = time.perf_counter()
        try:
            model = BlipForConditionalGeneration.from_pretrained(location, dtype=torch_dtype)
            # The PIL image processor explicitly (not AutoImageProcessor's pick): identical pixels whether
            # or not torchvision is installed. It reads both preprocessor_config.json (the hub layout) and
            # the processor_config.json that transformers 5 writes.
            image_processor = BlipImageProcessorPil.from_pretrained(location)
            tokenizer = AutoTokenizer.from_pretrained(location)
        except OSError as exc:
            hint = (
                "the folder lacks BLIP model files; rebuild the tiny models with `make models`"
                if is_local
                else f"download it where there is internet (`hf download {model_id}`) into the Hugging Face "
                "cache, or point the config at a local folder"
            )
            raise ModelFilesMissing("BLIP captioner model", location, hint=f"{hint} ({exc})") from exc
        processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
        captioner = cls(
            model,
            processor,
            device=device,
            prefixes=prefixes,
            max_new_tokens=max_new_tokens,
            no_repeat_ngram_size=no_repeat_ngram_size,
            repetition_penalty=repetition_penalty,
        )
        log.info(
            "BLIP captioner loaded from %s on %s (%s) in %.2f s",
            location,
            captioner.device,
            str(torch_dtype).removeprefix("torch."),
            time.perf_counter() - start,
        )
        return captioner

    @property
    def prefixes(self) -> tuple[str, ...]:
        return self._current[0].prefixes

    def set_prefixes(self, prefixes: Sequence[str]) -> None:
        """Replace the conditional prefixes (validated; see :func:`validate_prefixes`) without reloading."""
        self.configure(prefixes, self._current[1])

    @property
    def decoding(self) -> DecodeSettings:
        return self._current[1]

    @property
    def max_new_tokens(self) -> int:
        return self._current[1].max_new_tokens

    def set_decoding(self, settings: DecodeSettings) -> None:
        """Replace the decode settings without reloading; raises :class:`InvalidParameter` (field
        ``max_new_tokens``) when a prompt would no longer fit in the decoder's positions."""
        self.configure(self._current[0].prefixes, settings)

    def configure(self, prefixes: Sequence[str], settings: DecodeSettings) -> None:
        """Prefixes and decode settings together (Serve's ``reconfigure``): both are checked before
        either is applied, so a refused config leaves the captioner as it was."""
        self._check_length(self._unconditional, settings.max_new_tokens, field="max_new_tokens")
        validated = validate_prefixes(prefixes)
        # A prompt that no longer fits is the fault of what changed: new prefixes, or else the new length.
        blame = "prefixes" if validated != self._current[0].prefixes else "max_new_tokens"
        state = self._encode(validated, settings.max_new_tokens, field=blame)
        self._current = (state, settings)
        log.info("captioner prefixes %r, decoding %s", state.prefixes, settings)

    def caption(self, image: Image.Image) -> CaptionSet:
        """Caption one image (any PIL mode; it goes through ``to_rgb``)."""
        return self.caption_batch([image])[0]

    def caption_batch(self, images: Sequence[Image.Image]) -> list[CaptionSet]:
        """Caption several images; equal, image by image, to :meth:`caption` (up to float rounding of
        batched kernels, which greedy decoding absorbs unless two tokens tie)."""
        import torch
        from PIL import Image

        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{i}] must be a PIL image but is {type(image).__name__}")
        if not images:
            return []
        state, decoding = self._current  # one snapshot for the whole call
        start = time.perf_counter()

        # 1. Pixels.
        rgb = [to_rgb(image) for image in images]
        pixel_values = self._image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(self.device, self._dtype)

        with torch.inference_mode():
            # 2. Encode every image once.
            image_embeds = self._model.vision_model(pixel_values=pixel_values)[0]
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            # 3. Decode each prompt for the whole batch.
            per_prompt = [
                self._decode(prompt, image_embeds, image_mask, decoding)
                for prompt in (self._unconditional, *state.prompts)
            ]

        results = [
            CaptionSet(
                unconditional=per_prompt[0][i],
                conditional=tuple(
                    (prefix, captions[i])
                    for prefix, captions in zip(state.prefixes, per_prompt[1:], strict=True)
                ),
            )
            for i in range(len(images))
        ]
        log.debug(
            "captioned %d image(s) x %d prompt(s) in %.3f s",
            len(images),
            1 + len(state.prompts),
            time.perf_counter() - start,
        )
        return results

    def _decode(
        self, prompt: _DecoderPrompt, image_embeds: torch.Tensor, image_mask: torch.Tensor, decoding: DecodeSettings
    ) -> list[str]:
        """Greedy-decode one prompt for every image and return the continuations as text."""
        import torch

        batch = image_embeds.shape[0]
        input_ids = torch.tensor([prompt.ids], dtype=torch.long, device=image_embeds.device).repeat(batch, 1)
        # What BlipForConditionalGeneration.generate does after its vision pass, with the embeddings reused.
        output = self._model.text_decoder.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            eos_token_id=self._sep_id,
            pad_token_id=self._pad_id,
            **decoding.generate_kwargs(),
        )
        # 4. Cut the echoed prompt by token count, after checking that it really is the prompt.
        n = len(prompt.ids)
        if output.shape[1] < n or not torch.equal(output[:, :n], input_ids):
            raise RuntimeError(
                f"BLIP's decoder output does not start with its prompt {prompt.ids}: got {output[:, :n].tolist()}"
            )
        return [
            " ".join(self._tokenizer.decode(row, skip_special_tokens=True).split())
            for row in output[:, n:].tolist()
        ]

    def _encode(self, prefixes: tuple[str, ...], max_new_tokens: int, *, field: str = "prefixes") -> _PrefixState:
        prompts = []
        for prefix in prefixes:
            # [DEC] + the prefix tokens: what BLIP's generate builds from the processor's "[CLS] ... [SEP]".
            ids = self._tokenizer(prefix, add_special_tokens=False)["input_ids"]
            prompt = _DecoderPrompt(prefix=prefix, ids=(self._bos_id, *ids))
            self._check_length(prompt, max_new_tokens, field=field)
            prompts.append(prompt)
        return _PrefixState(prefixes=prefixes, prompts=tuple(prompts))

    def _check_length(self, prompt: _DecoderPrompt, max_new_tokens: int, *, field: str) -> None:
        """The decoder has learned position embeddings: prompt + new tokens must fit in them."""
        total = len(prompt.ids) + max_new_tokens
        if total > self._max_positions:
            what = "the unconditional prompt" if prompt.prefix is None else f"prefix {prompt.prefix!r}"
            raise InvalidParameter(
                f"`{field}`: {what} is {len(prompt.ids)} tokens; with max_new_tokens={max_new_tokens} "
                f"that is {total}, over the decoder's {self._max_positions} positions.",
                field=field,
            )
