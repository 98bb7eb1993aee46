"""Where the generator's memory peak is, measured without a GPU: live tensor bytes of the full-size models.

    python -m bench.vram [--size 1024] [--dtype bfloat16] [--no-write]

The full-size SDXL architecture is built on PyTorch's ``meta`` device (shapes and dtypes, no storage), and
each stage of one generation runs under :class:`LiveBytes`, a dispatch mode that adds up the bytes of
every tensor an operation creates (rounded up to the 512-byte blocks of PyTorch's CUDA allocator) and
subtracts them when the tensor is freed: the peak is what ``torch.cuda.max_memory_allocated`` counts above
the weights, less what the GPU's libraries take for themselves (cuDNN and cuBLAS workspaces) and the
allocator's rounding of large blocks. Stages: the VAE decode of one image (default and
``vae_inplace``), the UNet's forward on the CFG batch of 2 (one denoising step; eager, the attention as
one ``scaled_dot_product_attention`` call), and both text encoders. On meta tensors nothing is computed,
so a full-size pass takes seconds on a CPU.
"""

from __future__ import annotations

import argparse
import logging
import time
import weakref
from typing import Any

from bench.common import Table, append_report, command_line, machine, render_section, write_out_dir

log = logging.getLogger("bench.vram")

#: PyTorch's CUDA caching allocator hands out blocks in multiples of 512 bytes.
BLOCK = 512


def live_bytes_mode() -> Any:
    """A :class:`LiveBytes` dispatch mode (built lazily: torch is imported inside)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    class LiveBytes(TorchDispatchMode):
        """Bytes of the tensors created inside the mode and still alive: ``now``, ``peak`` and the operation
        that reached the peak (``peak_at``: its name and its tensor arguments' shapes)."""

        def __init__(self) -> None:
            super().__init__()
            self._live: Any = WeakIdKeyDictionary()
            self.now = 0
            self.peak = 0
            self.peak_at: tuple[str, list[tuple[int, ...]]] = ("", [])

        def _free(self, size: int) -> None:
            self.now -= size

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                if storage in self._live:
                    continue
                size = -(-storage.nbytes() // BLOCK) * BLOCK
                self._live[storage] = size
                self.now += size
                weakref.finalize(storage, self._free, size)
            if self.now > self.peak:
                self.peak = self.now
                shapes = [tuple(a.shape) for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
                self.peak_at = (str(func), shapes)
            return out

    return LiveBytes()


def measure(fn: Any) -> tuple[int, tuple[str, list[tuple[int, ...]]]]:
    """Peak live bytes of what ``fn`` creates (under inference mode), and the operation at the peak."""
    import torch

    with torch.inference_mode(), live_bytes_mode() as live:
        result = fn()
        del result
    return live.peak, live.peak_at


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--no-write", action="store_true", help="print the table; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from bench.fullsize import build_sdxl_components
    from deskgen.generator.lean_vae import lean_decoder

    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    parts = build_sdxl_components("meta", dtype)
    unet, vae = parts["unet"], parts["vae"]
    for model in (unet, vae):  # what optimise_pipeline sets on CUDA
        model.set_attn_processor(AttnProcessor2_0())
        model.to(memory_format=torch.channels_last)
    weights = {name: sum(p.numel() * p.element_size() for p in parts[name].parameters())
               for name in ("unet", "vae", "text_encoder", "text_encoder_2")}  # fmt: skip
    side = args.size // 8
    latents = torch.empty(1, 4, side, side, device="meta", dtype=dtype)
    rows: list[tuple[str, int, tuple[str, list[tuple[int, ...]]]]] = []
    rows.append(("VAE decode, diffusers' forward", *measure(lambda: vae.decode(latents).sample)))
    lean_decoder(vae)
    rows.append(("VAE decode, `vae_inplace`", *measure(lambda: vae.decode(latents).sample)))
    config = unet.config
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    step = {
        "sample": torch.empty(2, 4, side, side, device="meta", dtype=dtype).to(memory_format=torch.channels_last),
        "timestep": torch.tensor(500.0, device="meta"),
        "encoder_hidden_states": torch.empty(2, 77, config.cross_attention_dim, device="meta", dtype=dtype),
        "added_cond_kwargs": {"text_embeds": torch.empty(2, text_dim, device="meta", dtype=dtype),
                              "time_ids": torch.empty(2, 6, device="meta", dtype=dtype)},
    }  # fmt: skip
    rows.append(("UNet forward, CFG batch of 2 (one step)", *measure(lambda: unet(**step, return_dict=False)[0])))
    ids = torch.zeros(2, 77, dtype=torch.long, device="meta")
    rows.append(("text encoders (CFG pair)", *measure(lambda: (
        parts["text_encoder"](ids, output_hidden_states=True), parts["text_encoder_2"](ids, output_hidden_states=True)))))
    table = Table(
        f"Live tensor bytes per stage — full-size SDXL on the meta device, {args.size}x{args.size}, {args.dtype}, "
        "channels_last, SDPA",
        ["stage", "peak above the weights GiB", "operation at the peak", "its tensor arguments"],
    )
    for stage, peak, (op, shapes) in rows:
        table.add(stage, f"{peak / 2**30:.3f}", f"`{op}`", ", ".join(str(s) for s in shapes))
    gib = {k: v / 2**30 for k, v in weights.items()}
    table.notes += [
        "Weights (GiB): " + ", ".join(f"{k} {v:.3f}" for k, v in gib.items()) + f"; in all {sum(gib.values()):.3f}.",
        "Not counted: cuDNN/cuBLAS workspaces, the allocator's rounding of large blocks, the LoRA factors and "
        "buffers a replica keeps: compare with `torch.cuda.max_memory_allocated` from `python -m bench.gpu`.",
    ]
    section = render_section("Memory peak per stage, without a GPU", [table], command=command_line(),
                             wall_s=time.perf_counter() - started, host=machine())  # fmt: skip
    print(section)
    write_out_dir("vram", section, {r[0]: {"peak_bytes": r[1], "op": r[2][0]} for r in rows})
    if not args.no_write:
        append_report(section)


if __name__ == "__main__":
    main()
