"""Build a tiny BLIP captioning folder (``out/blip``) offline: same architecture and file layout as
``Salesforce/blip-image-captioning-base``, random weights, a tokenizer built in code.

What is written (what ``BlipForConditionalGeneration.from_pretrained`` / the captioner read)::

    blip/config.json, model.safetensors, generation_config.json    BlipForConditionalGeneration
    blip/processor_config.json                                      BlipProcessor + its image processor
                                                                    (64x64; the hub checkpoint has the
                                                                    older preprocessor_config.json)
    blip/tokenizer.json, tokenizer_config.json                      BertTokenizer with [DEC] as bos

The vocabulary holds the special tokens, [DEC], punctuation, every word of the desk-object vocabulary
(deskgen.prompts.vocabulary.DESK_VOCABULARY), the words of the default prefixes and about 150 common caption
words, so captions decode to real words and prefixes tokenize without [UNK].

Steering (so the keyword ranking has something real to rank). A random decoder of this size has
near-uniform logits, and BERT's post-LayerNorm residual stream is dominated by the current token, so its
greedy captions are one token repeated and ignore the image. After the seeded random init we

  1. give the "caption" words (the canonical desk objects and a few connectors: a, with, and, on, next,
     to) larger random embeddings (std 0.5 instead of 0.02) and +4 LM-head bias. The LM head is tied to
     the input embeddings, so this makes a random bigram chain among those words;
  2. scale the decoder's cross-attention output projections by 10, so the image embeddings shift that
     chain (without it every image gets the same captions);
  3. initialise the vision tower at std 0.02 (BlipVisionConfig's default 1e-10 makes it ignore pixels).

Greedy captions then read like "router controller mug and pencil keyboard organizer and ...": desk
words that differ by prefix (the prompt tokens start the chain) and by image. [SEP] is left alone, so
captions run to ``max_new_tokens`` and end in a loop, as real greedy BLIP captions sometimes do; the
prompt builder collapses such loops. Everything is seeded; a build takes about a second.
"""

from __future__ import annotations

import logging
from pathlib import Path

from deskgen.prompts.captions import DEFAULT_PREFIXES
from deskgen.prompts.vocabulary import DESK_VOCABULARY

log = logging.getLogger(__name__)

SEED = 1234
IMAGE_SIZE = 64
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
PUNCTUATION = tuple(".,:;?!'\"-_()/&")
COMMON_WORDS = (
    "a an the and or with on in of at to by for from near next under above behind beside between "
    "is are was it its this that these there some two three four several many few one "
    "white black grey gray brown wooden wood dark bright small large big long little modern clean "
    "cozy minimal tidy empty colorful blue green red yellow orange pink purple silver metal glass "
    "room office home workspace setup station studio corner wall floor table top front side view "
    "sitting standing lit light lights lighting sunlight night day morning evening "
    "photo picture image close up shot q what which where how do does objects object items item "
    "desk gaming work working study computer set sits placed filled covered has have"
).split()
#: Words the steered decoder prefers besides the canonical desk objects.
CAPTION_CONNECTORS = ("a", "with", "and", "on", "next", "to")


def _vocabulary() -> dict[str, int]:
    words: list[str] = [*SPECIAL_TOKENS, *PUNCTUATION, *COMMON_WORDS]
    for term in DESK_VOCABULARY:
        words.extend(term.lower().replace("-", " - ").split())
    for prefix in DEFAULT_PREFIXES:
        words.extend(prefix.lower().replace(":", " ").replace("?", " ").replace("_", " ").split())
    vocab: dict[str, int] = {}
    for word in words:
        vocab.setdefault(word, len(vocab))
    return vocab


def build(out: Path) -> None:
    """Write ``out/blip``. Deterministic (fixed seed); about a second on one CPU core."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    target = out / "blip"
    target.mkdir(parents=True, exist_ok=True)
    vocab = _vocabulary()
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=512)
    pad_id, sep_id, dec_id = vocab["[PAD]"], vocab["[SEP]"], vocab["[DEC]"]

    config = BlipConfig(
        vision_config={
            "image_size": IMAGE_SIZE,
            "patch_size": 16,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 32,
            # BlipVisionConfig defaults to 1e-10 (fine for loading trained weights); at that scale a random
            # ViT ignores its pixels and every image gets the same caption.
            "initializer_range": 0.02,
        },
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "encoder_hidden_size": 32,  # = vision hidden size: the decoder cross-attends to patch embeddings
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 32,
            "max_position_embeddings": 128,
            "bos_token_id": dec_id,
            "eos_token_id": sep_id,
            "sep_token_id": sep_id,
            "pad_token_id": pad_id,
        },
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(SEED)
    model = BlipForConditionalGeneration(config).eval()
    _steer(model, vocab)

    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    log.info("tiny BLIP (%d-word vocabulary) written to %s", len(vocab), target)


def _steer(model: object, vocab: dict[str, int]) -> None:
    """Bias the random decoder towards caption-like desk words; see the module docstring."""
    import torch

    text_decoder = model.text_decoder  # type: ignore[attr-defined]
    embeddings = text_decoder.get_input_embeddings().weight
    bias = text_decoder.cls.predictions.bias
    words = {*CAPTION_CONNECTORS, *DESK_VOCABULARY.values()}
    favoured = sorted(vocab[w] for w in words if w in vocab)  # multi-word objects ("mouse pad") are skipped
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        embeddings[favoured] = torch.randn(len(favoured), embeddings.shape[1], generator=generator) * 0.5
        bias[favoured] += 4.0
        for layer in text_decoder.bert.encoder.layer:
            layer.crossattention.output.dense.weight.mul_(10.0)
