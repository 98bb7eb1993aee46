"""A tiny, randomly initialised OWLv2 open-vocabulary detector, built offline in about a second.

    build(out)  ->  out/owlv2/   Owlv2ForObjectDetection.save_pretrained folder + Owlv2Processor
                                  (a CLIP tokenizer built in code, the PIL image processor at 96 px)

OWLv2's architecture at toy widths: a CLIP text tower (16 positions, as in google/owlv2-base-patch16-ensemble)
and a ViT vision tower of 16 px patches on a 96 px input, so a 6x6 grid of 36 query boxes, each with the
class head (scores against every text query) and the box head (``(cx, cy, w, h)`` around its patch). The
weights are drawn from a seeded normal distribution rather than the model's own initialisation, which
zeroes the heads (every score 0.5, every box degenerate): here scores spread (about 0.34-0.51) and boxes
follow the patch grid, so thresholds and box post-processing see varied input. Everything is seeded, so
two builds write identical tensors. It loads through ``Locator.from_pretrained`` like the real checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

SEED = 4321
IMAGE_SIZE = 96
PATCH_SIZE = 16
#: OWLv2's text tower sees 16 tokens (the real checkpoint's max_position_embeddings).
TEXT_POSITIONS = 16
WIDTH = 32


def build(out: Path) -> Path:
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    from deskgen.tools.tiny_sdxl import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = TEXT_POSITIONS
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    config = Owlv2Config(
        text_config={"vocab_size": len(tokenizer), "hidden_size": WIDTH, "intermediate_size": 2 * WIDTH,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": TEXT_POSITIONS, **ids},
        vision_config={"hidden_size": WIDTH, "intermediate_size": 2 * WIDTH, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
        projection_dim=WIDTH,
    )  # fmt: skip
    torch.manual_seed(SEED)
    model = Owlv2ForObjectDetection(config).eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer=tokenizer
    )
    folder = out / "owlv2"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    log.info("tiny OWLv2 written to %s", folder)
    return folder
