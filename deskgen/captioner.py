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
     ``model.generate(pixel_values, input_ids)`` returns (a unit test pins that).
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

from deskgen.errors import InvalidParameter, ModelFilesMissing
from deskgen.images import to_rgb
from deskgen.limits import MAX_PREFIX_CHARS, MAX_PREFIXES
from deskgen.paths import resolve_model_id
from deskgen.prompt import DEFAULT_PREFIXES

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "Salesforce/blip-image-captioning-base"
DTYPES = ("float32", "float16", "bfloat16")


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


def _torch_dtype(dtype: str | None, device: str) -> torch.dtype:
    import torch

    if dtype is None:
        # fp16 is the GPU default (half the memory, tensor cores); on CPU fp16 kernels are slow or missing.
        dtype = "float16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise InvalidParameter(f"`dtype` must be one of {', '.join(DTYPES)} but is {dtype!r}.", field="dtype")
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


class Captioner:
    """BLIP captioning of desk photos.

    Responsibilities: hold a ``BlipForConditionalGeneration`` and its processor on one device; validate
    and tokenize the conditional prefixes (changeable at run time with :meth:`set_prefixes`); caption
    one image or a batch with deterministic greedy decoding; return captions without echoed prefixes.

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
        max_new_tokens: int = 30,
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
        self.max_new_tokens = _check_max_new_tokens(max_new_tokens)
        self._unconditional = _DecoderPrompt(prefix=None, ids=(self._bos_id,))
        self._check_length(self._unconditional, field="max_new_tokens")
        self._state = self._encode(validate_prefixes(prefixes))

    @classmethod
    def from_pretrained(
        cls,
        model_id: str = DEFAULT_MODEL_ID,
        *,
        device: str | None = None,
        dtype: str | None = None,
        prefixes: Sequence[str] = DEFAULT_PREFIXES,
        max_new_tokens: int = 30,
    ) -> Captioner:
        """Load a BLIP captioning checkpoint: a hub id, or a local folder (relative paths are resolved
        against the project root, see :func:`deskgen.paths.resolve_model_id`).

        Defaults: ``cuda`` + ``float16`` where a GPU is available, ``cpu`` + ``float32`` otherwise.
        Raises :class:`ModelFilesMissing` naming the path when a local folder does not exist or lacks the
        model files, or when a hub id is neither cached nor downloadable; :class:`InvalidParameter` for an
        unknown ``dtype`` or an unavailable ``device``.
        """
        import torch
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
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InvalidParameter(f"`device` is {device!r} but no CUDA device is available.", field="device")
        torch_dtype = _torch_dtype(dtype, device)
        # Cheap checks before the expensive load (the position limit needs the model's config).
        validate_prefixes(prefixes)
        _check_max_new_tokens(max_new_tokens)

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
        captioner = cls(model, processor, device=device, prefixes=prefixes, max_new_tokens=max_new_tokens)
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
        return self._state.prefixes

    def set_prefixes(self, prefixes: Sequence[str]) -> None:
        """Replace the conditional prefixes (validated; see :func:`validate_prefixes`) without reloading."""
        self._state = self._encode(validate_prefixes(prefixes))
        log.info("captioner prefixes set to %r", self._state.prefixes)

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
        state = self._state  # one snapshot for the whole call
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
                self._decode(prompt, image_embeds, image_mask)
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
        self, prompt: _DecoderPrompt, image_embeds: torch.Tensor, image_mask: torch.Tensor
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
            max_new_tokens=self.max_new_tokens,
            num_beams=1,
            do_sample=False,
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

    def _encode(self, prefixes: tuple[str, ...]) -> _PrefixState:
        prompts = []
        for prefix in prefixes:
            # [DEC] + the prefix tokens: what BLIP's generate builds from the processor's "[CLS] ... [SEP]".
            ids = self._tokenizer(prefix, add_special_tokens=False)["input_ids"]
            prompt = _DecoderPrompt(prefix=prefix, ids=(self._bos_id, *ids))
            self._check_length(prompt, field="prefixes")
            prompts.append(prompt)
        return _PrefixState(prefixes=prefixes, prompts=tuple(prompts))

    def _check_length(self, prompt: _DecoderPrompt, *, field: str) -> None:
        """The decoder has learned position embeddings: prompt + new tokens must fit in them."""
        total = len(prompt.ids) + self.max_new_tokens
        if total > self._max_positions:
            what = "the unconditional prompt" if prompt.prefix is None else f"prefix {prompt.prefix!r}"
            raise InvalidParameter(
                f"`{field}`: {what} is {len(prompt.ids)} tokens; with max_new_tokens={self.max_new_tokens} "
                f"that is {total}, over the decoder's {self._max_positions} positions.",
                field=field,
            )
