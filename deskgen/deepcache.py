"""DeepCache for the SDXL UNet: reuse the deep features of the last full step on the steps in between.

    cache = DeepCache(pipe.unet, interval=3)   # installs itself on the UNet
    cache.reset()                               # before every generation
    ... pipe(...)                               # steps 0, 3, 6, ... full; the others shallow

The UNet's deep blocks change slowly from one denoising step to the next (Ma et al., *DeepCache:
Accelerating Diffusion Models for Free*, CVPR 2024). On a **full** step the UNet runs as usual and the
input of its last up block (the output of the up block before it: everything below the first
resolution level) is kept. On a **shallow** step only the time embedding, ``conv_in``, the resnets of
the first down block, the last up block (fed the kept deep feature and the fresh skip connections) and
the output convolution run — for SDXL the two full-resolution, attention-free blocks, a small part of
the UNet's work. Steps ``0, interval, 2*interval, ...`` of each generation are full.

This changes the image (it approximates the skipped blocks): a **speed profile of its own**, never on
by default; the benchmark reports its distance to the exact image. The step counter is per generation
(:meth:`reset`), and the kept feature is dropped when the batch or image size changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deskgen.errors import InvalidParameter

if TYPE_CHECKING:
    import torch

MAX_INTERVAL = 10


class DeepCache:
    """Installed on ``unet`` (replaces its ``forward`` on the instance; :meth:`remove` restores it)."""

    def __init__(self, unet: Any, interval: int) -> None:
        if not isinstance(interval, int) or isinstance(interval, bool) or not 2 <= interval <= MAX_INTERVAL:
            raise InvalidParameter(
                f"`deepcache_interval` must be an integer in [2, {MAX_INTERVAL}] but is {interval!r}.",
                field="deepcache_interval",
            )
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        if getattr(first, "has_cross_attention", False) or getattr(last, "has_cross_attention", False) or (
            len(first.resnets) + 1 != len(last.resnets)
        ):
            raise InvalidParameter(
                "`deepcache_interval`: this UNet's first down block / last up block are not SDXL's attention-free "
                f"pair ({type(first).__name__} with {len(first.resnets)} resnets, {type(last).__name__} with "
                f"{len(last.resnets)}).",
                field="deepcache_interval",
            )
        self.unet = unet
        self.interval = interval
        self.step = 0
        self.full_steps = 0
        self.shallow_steps = 0
        self._deep: torch.Tensor | None = None
        self._capture = False
        self._hook = unet.up_blocks[-2].register_forward_hook(self._keep)
        unet.forward = self.forward  # nn.Module.__call__ looks the instance attribute up first

    def remove(self) -> None:
        self._hook.remove()
        if self.unet.__dict__.get("forward") == self.forward:
            del self.unet.forward
        self._deep = None

    def reset(self) -> None:
        """Start a new generation: the next UNet call is a full step."""
        self.step = 0
        self._deep = None

    def _keep(self, module: Any, args: Any, output: torch.Tensor) -> None:
        if self._capture:
            self._deep = output

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, *args: Any,
                **kwargs: Any) -> Any:  # fmt: skip
        step, self.step = self.step, self.step + 1
        deep = self._deep
        shallow = step % self.interval != 0 and deep is not None and deep.shape[0] == sample.shape[0] and (
            deep.shape[-2:] == sample.shape[-2:]
        )
        if deep is None or not shallow:
            self._capture = True
            try:
                out = type(self.unet).forward(self.unet, sample, timestep, encoder_hidden_states, *args, **kwargs)
            finally:
                self._capture = False
            self.full_steps += 1
            return out
        self.shallow_steps += 1
        return self._shallow(sample, timestep, encoder_hidden_states, deep, **kwargs)

    def _shallow(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        deep: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **_: Any,
    ) -> Any:
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (hidden,)
        for resnet in unet.down_blocks[0].resnets:
            hidden = resnet(hidden, emb)
            skips += (hidden,)
        out = unet.up_blocks[-1](hidden_states=deep, temb=emb, res_hidden_states_tuple=skips)
        if unet.conv_norm_out is not None:
            out = unet.conv_act(unet.conv_norm_out(out))
        out = unet.conv_out(out)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)
