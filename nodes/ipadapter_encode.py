"""From reference images to image tokens: CLIP vision encoding (checked against the adapter's encoder), the
neutral embeds, the enhancer's tiles, and the adapter's projection."""
from __future__ import annotations

from dataclasses import dataclass, replace

import comfy.utils
import torch

from ..ipadapter_core import prep
from ..ipadapter_core.apply_options import WHOLE_IMAGE
from ..ipadapter_core.embeds import combine_embeds, enhance_embeds, merge_tile_embeds
from ..ipadapter_core.loader import AdapterFile, load_adapter
from ..ipadapter_core.projection import build_projection
from ..ipadapter_core.variants import ENCODERS, check_embeds, check_encoder
from .siglip_head import pooling_head

ENCODE_BATCH = 16  # reference images per CLIP vision call


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter file with its projection model built (float32, CPU), and the encoders a unified
    loader found for it (used when an apply node has none connected)."""
    file: AdapterFile
    projection: torch.nn.Module
    clip_vision: object | None = None
    insightface: object | None = None


def load(path: str, **encoders) -> LoadedAdapter:
    adapter = load_adapter(path)
    return LoadedAdapter(adapter, build_projection(adapter.variant, adapter.image_proj), **encoders)


def clip_vision_for(adapter: LoadedAdapter, clip_vision, encoder: str | None = None):
    """The connected CLIP vision, else the one the unified loader attached; an error names the one needed."""
    clip_vision = clip_vision if clip_vision is not None else adapter.clip_vision
    if clip_vision is None:
        encoder = encoder or adapter.file.variant.encoder
        raise ValueError(f"clip_vision: {adapter.file.name} needs the CLIP vision {encoder} "
                         f"({ENCODERS[encoder]['file']} in models/clip_vision): connect a Load CLIP Vision node, "
                         f"or load the adapter with the unified loader")
    return clip_vision


@torch.no_grad()
def encode_images(adapter: LoadedAdapter, clip_vision, image: torch.Tensor, output: str, name: str = "image",
                  encoder: str | None = None) -> torch.Tensor:
    """CLIP vision ``output`` ("image_embeds", "pooled" or "penultimate") of each image: [n, E] or [n, N, E],
    in batches with the host's progress bar. The encoder is checked against the adapter's."""
    image = prep.as_rgb(image, name)
    variant = adapter.file.variant
    encoder = encoder or variant.encoder
    progress = comfy.utils.ProgressBar(image.shape[0])
    parts = []
    for start in range(0, image.shape[0], ENCODE_BATCH):
        encoded = clip_vision.encode_image(image[start:start + ENCODE_BATCH])
        if start == 0:
            check_encoder(replace(variant, encoder=encoder), adapter.file.name,
                          encoded.penultimate_hidden_states.shape[-1], encoded.image_embeds.shape[-1],
                          getattr(clip_vision, "image_size", None))
        if output == "pooled":
            head = pooling_head(clip_vision, ENCODERS[encoder]["pooling_heads"], adapter.file.name)
            parts.append(head(encoded.last_hidden_state.float().cpu()))
        else:
            parts.append(encoded.image_embeds if output == "image_embeds" else encoded.penultimate_hidden_states)
        progress.update(parts[-1].shape[0])
    return torch.cat(parts).float().cpu()


def neutral_embeds(adapter: LoadedAdapter, clip_vision, like: torch.Tensor, output: str | None = None,
                   encoder: str | None = None) -> torch.Tensor:
    """The unconditional embeds of the reference implementations, shaped like ``like``: zeros for pooled
    and face embeds; for hidden states, the encoding of an image of CLIP's mean colour (zeros after CLIP's
    normalisation), which is what the official code feeds; where the variant says otherwise, zeros or a black
    image's encoding (``Variant.uncond_image``)."""
    output = output or adapter.file.variant.encoder_output
    if adapter.file.variant.uncond_image == "zeros":
        return torch.zeros_like(like)
    if adapter.file.variant.uncond_image == "black image":
        return encode_images(adapter, clip_vision, torch.zeros(1, 224, 224, 3), output, encoder=encoder).expand_as(like)
    if output != "penultimate":
        return torch.zeros_like(like)
    neutral = torch.tensor(prep.CLIP_MEAN).expand(1, 224, 224, 3)
    return encode_images(adapter, clip_vision, neutral, "penultimate", encoder=encoder).expand_as(like)


def enhanced_embeds(adapter: LoadedAdapter, clip_vision, image: torch.Tensor, output: str, tiles: int,
                    ratio: float) -> torch.Tensor:
    """The CLIP-vision enhancer: each image is also encoded as a tiles x tiles grid, merged back to one
    image's embeds (merge_tile_embeds) and joined to the whole image's (enhance_embeds)."""
    grid = prep.grid_tiles(prep.as_rgb(image), tiles)
    tile_embeds = encode_images(adapter, clip_vision, grid.flatten(0, 1), output).unflatten(0, grid.shape[:2])
    return enhance_embeds(encode_images(adapter, clip_vision, image, output), merge_tile_embeds(tile_embeds), ratio)


def reference_embeds(adapter: LoadedAdapter, clip_vision, image: torch.Tensor, negative: torch.Tensor | None = None,
                     enhance: tuple[int, float] = WHOLE_IMAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Cond and uncond CLIP embeds of reference images: the output the variant reads (with ``enhance``,
    (tiles per side, ratio), above one tile: the enhancer's), and for uncond the encoding of ``negative``
    if given, else the neutral embeds."""
    if adapter.file.variant.encoder_output == "face":
        raise ValueError(f"ipadapter: {adapter.file.name} is a FaceID adapter: it reads face embeddings, not "
                         f"CLIP image embeds; use Apply IP-Adapter FaceID")
    clip_vision = clip_vision_for(adapter, clip_vision)
    output = adapter.file.variant.encoder_output
    tiles, ratio = enhance
    embeds = (encode_images(adapter, clip_vision, image, output) if tiles == 1
              else enhanced_embeds(adapter, clip_vision, image, output, tiles, ratio))
    if negative is None:
        return embeds, neutral_embeds(adapter, clip_vision, embeds)
    return embeds, encode_images(adapter, clip_vision, negative, output, "image_negative")


def paired_embeds(adapter: LoadedAdapter, embeds: torch.Tensor,
                  uncond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """EMBEDS and their uncond EMBEDS, both checked against the adapter; ``uncond`` defaults to zeros and is
    cycled to the n images of ``embeds``."""
    variant, name = adapter.file.variant, adapter.file.name
    check_embeds(variant, name, tuple(embeds.shape))
    uncond = torch.zeros_like(embeds) if uncond is None else uncond
    check_embeds(variant, name, tuple(uncond.shape))
    return embeds, uncond[torch.arange(embeds.shape[0]) % uncond.shape[0]]


@torch.no_grad()
def image_tokens(adapter: LoadedAdapter, embeds: torch.Tensor, uncond: torch.Tensor | None = None,
                 combine: str = "concat", unfold: bool = False, clip_hidden=None,
                 shortcut_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cond and uncond image tokens from EMBEDS: [1, n*T, D] (every latent sees all n images, or their
    combination), or [n, T, D] with ``unfold`` (latent i sees image i). ``uncond`` defaults to zeros
    and is cycled to n. FaceID-Plus also takes the CLIP hidden states (cond, uncond) of the face crops."""
    variant, name = adapter.file.variant, adapter.file.name
    if variant.projection == "time_resampler":
        raise ValueError(f"ipadapter: {name} ({variant.name}) makes its image tokens at each step; use Apply "
                         f"IP-Adapter, Apply IP-Adapter (Advanced) or Apply IP-Adapter Embeds with it")
    embeds, uncond = paired_embeds(adapter, embeds, uncond)
    if not unfold:
        embeds, uncond = combine_embeds(embeds, combine), combine_embeds(uncond, combine)
        clip_hidden = clip_hidden and tuple(combine_embeds(h, combine) for h in clip_hidden)

    def project(x, hidden):
        x = x.float().cpu()
        if variant.projection == "faceid_plus":
            if hidden is None:
                raise ValueError(f"clip_vision: {name} ({variant.name}) also needs the CLIP vision "
                                 f"{variant.clip_encoder} of the face image")
            return adapter.projection(x, hidden.float().cpu()[torch.arange(x.shape[0]) % hidden.shape[0]],
                                      shortcut_scale)
        return adapter.projection(x)

    hidden_cond, hidden_uncond = clip_hidden or (None, None)
    cond_tokens, uncond_tokens = project(embeds, hidden_cond), project(uncond, hidden_uncond)
    if not (torch.isfinite(cond_tokens).all() and torch.isfinite(uncond_tokens).all()):
        raise ValueError(f"embeds: the reference embeddings give NaN or inf image tokens for {name}; "
                         f"check the image or embeds fed to it")
    width = cond_tokens.shape[-1]
    if unfold:
        return cond_tokens, uncond_tokens
    return cond_tokens.reshape(1, -1, width), uncond_tokens.reshape(1, -1, width)
