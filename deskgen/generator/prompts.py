"""Prompts longer than CLIP's 77 tokens, for SDXL's two text encoders.

SDXL's text encoders see at most ``model_max_length`` (77) tokens, start and end markers included;
diffusers cuts the rest and only logs a warning. :class:`PromptEncoder` embeds a longer prompt the way
A1111, ComfyUI and compel do: its tokens are split into chunks of 75 (at a comma or word end near the
limit where there is one), each chunk framed by the start/end tokens and padded to 77, each encoded
alone, and the chunks' hidden states concatenated along the sequence (the UNet's cross-attention takes
any length). The pooled embedding (SDXL's second encoder, into the time embedding) is the first
chunk's, as in compel. The negative prompt gets the same number of chunks (padded with empty-prompt
chunks), since the pipeline stacks both into one batch.

A prompt and negative prompt that both fit in 77 tokens are NOT encoded here: they go to the pipeline
as strings, so the short-prompt path is the pipeline's own, bit for bit. An empty negative prompt is
``None`` to the pipeline, which then uses zeros when the model says ``force_zeros_for_empty_prompt``
(SDXL base does), as SDXL intends, instead of the encoding of "".

Why not compel (2.5 works here: its embeddings of a short prompt equal the pipeline's bit for bit): it
parses its weighting syntax in every prompt (``(lamp)1.2``, ``desk++``, ``C++``), which would change
the meaning of text users send today; its multi-encoder API is deprecated for its v3; and it encodes an
empty negative prompt rather than SDXL's zeros. The chunking itself is the few lines below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: A chunk split prefers a comma, else a word end, within this many tokens of the chunk's limit.
SPLIT_LOOKBACK = 20


@dataclass(frozen=True)
class EncodedPrompts:
    """What the pipeline is called with for one prompt pair, and the numbers the metadata reports."""

    #: Keyword arguments for the pipeline call: the strings (short path) or the embeddings (long path).
    pipe_kwargs: dict[str, Any]
    #: The prompt's tokens by the pipeline's first tokenizer, start and end markers included (77 fit).
    prompt_tokens: int
    #: The negative prompt's tokens (0 for an empty negative prompt: zeros, no tokens).
    negative_prompt_tokens: int
    #: 77-token chunks per encoder (1: the pipeline's own path).
    chunks: int


def is_empty_negative(text: str) -> bool:
    """An empty (or blank) negative prompt: SDXL's ``force_zeros_for_empty_prompt`` case."""
    return not text.strip()


class PromptEncoder:
    """Counts tokens with the pipeline's own CLIP tokenizers and embeds prompts of any length.

    Uses the pipeline's text encoders as they are at call time, so the active LoRA mix (peft adapters,
    fused weights or hot-swap's text-encoder half) is in the embeddings, exactly as in the pipeline's
    own encoding: call it under the generator's lock, after the mix is activated.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        tokenizers = [t for t in (pipe.tokenizer, pipe.tokenizer_2) if t is not None]
        if not tokenizers:
            raise ValueError("the pipeline has no tokenizer")
        self.tokenizers = tokenizers
        self.max_length = int(tokenizers[0].model_max_length)

    def count(self, text: str) -> int:
        """Tokens of ``text`` by the first tokenizer, with the start and end markers (what must fit in 77)."""
        return len(self._ids(self.tokenizers[0], text)) + 2

    def fits(self, text: str) -> bool:
        """Whether every tokenizer of the pipeline fits ``text`` in one 77-token window."""
        return all(len(self._ids(t, text)) + 2 <= t.model_max_length for t in self.tokenizers)

    def prepare(self, prompt: str, negative_prompt: str, *, device: Any) -> EncodedPrompts:
        """The pipeline arguments for ``prompt`` / ``negative_prompt``: strings when both fit (the
        pipeline's own path), otherwise chunked embeddings (``prompt_embeds`` and the three others)."""
        negative: str | None = None if is_empty_negative(negative_prompt) else negative_prompt
        tokens = self.count(prompt)
        negative_tokens = 0 if negative is None else self.count(negative)
        if self.fits(prompt) and (negative is None or self.fits(negative)):
            return EncodedPrompts({"prompt": prompt, "negative_prompt": negative}, tokens, negative_tokens, 1)
        kwargs, chunks = self.embed(prompt, negative, device=device)
        return EncodedPrompts(kwargs, tokens, negative_tokens, chunks)

    def embed(self, prompt: str, negative: str | None, *, device: Any) -> tuple[dict[str, Any], int]:
        """Chunked embeddings of ``prompt`` and ``negative`` (None: zeros when the model says so)."""
        import torch

        pipe = self.pipe
        encoders = [(t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
                    if t is not None and e is not None]  # fmt: skip
        zeros = negative is None and bool(pipe.config.force_zeros_for_empty_prompt)
        texts = [prompt] if zeros else [prompt, negative or ""]
        chunked = {(i, j): self._chunks(tokenizer, text) for i, text in enumerate(texts)
                   for j, (tokenizer, _) in enumerate(encoders)}  # fmt: skip
        count = max(len(c) for c in chunked.values())
        hidden: list[list[Any]] = [[] for _ in texts]
        pooled: list[Any] = [None for _ in texts]
        with torch.no_grad():
            for j, (tokenizer, encoder) in enumerate(encoders):
                for i in range(len(texts)):
                    chunks = chunked[i, j] + [[]] * (count - len(chunked[i, j]))  # empty-prompt chunks pad
                    ids = torch.tensor([self._frame(tokenizer, c) for c in chunks], device=device)
                    out = encoder(ids, output_hidden_states=True)
                    # [chunks, 77, d] -> [1, chunks*77, d]; SDXL reads the penultimate layer (clip skip 1).
                    hidden[i].append(out.hidden_states[-2].reshape(1, -1, out.hidden_states[-2].shape[-1]))
                    if out[0].ndim == 2:  # the projection encoder: its pooled output, first chunk
                        pooled[i] = out[0][:1]
        dtype = pipe.text_encoder_2.dtype if pipe.text_encoder_2 is not None else pipe.unet.dtype
        embeds = [torch.cat(h, dim=-1).to(dtype=dtype, device=device) for h in hidden]
        pools = [p.to(dtype=dtype, device=device) for p in pooled]
        if zeros:
            embeds.append(torch.zeros_like(embeds[0]))
            pools.append(torch.zeros_like(pools[0]))
        kwargs = {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pools[0],
                  "negative_prompt_embeds": embeds[1], "negative_pooled_prompt_embeds": pools[1]}  # fmt: skip
        return kwargs, count

    def _ids(self, tokenizer: Any, text: str) -> list[int]:
        # verbose=False: no "sequence length is longer than the specified maximum" warning; we chunk.
        return list(tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)

    def _chunks(self, tokenizer: Any, text: str) -> list[list[int]]:
        ids = self._ids(tokenizer, text)
        size = int(tokenizer.model_max_length) - 2
        tokens = tokenizer.convert_ids_to_tokens(ids)
        chunks: list[list[int]] = []
        start = 0
        while len(ids) - start > size:
            cut = start + size
            window = range(cut - 1, max(start, cut - SPLIT_LOOKBACK) - 1, -1)
            comma = next((k for k in window if tokens[k].startswith(",")), None)
            word = next((k for k in window if tokens[k].endswith("</w>")), None)
            best = comma if comma is not None else word
            if best is not None:
                cut = best + 1
            chunks.append(ids[start:cut])
            start = cut
        chunks.append(ids[start:])
        return chunks

    @staticmethod
    def _frame(tokenizer: Any, chunk: list[int]) -> list[int]:
        length = int(tokenizer.model_max_length)
        ids = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        return ids + [tokenizer.pad_token_id] * (length - len(ids))
