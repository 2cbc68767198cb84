"""Edit models with reference latents, the host's and diffusers' (the independent reference), one transformer call each.

- ``kontext``: the factory's FLUX.1-dev layout (real widths, 2 double- and 1 single-stream blocks) through the host's
  diffusion-model loader, and diffusers' ``FluxTransformer2DModel`` with its weights (the host's Flux-to-diffusers
  map). FLUX.1 Kontext's file is FLUX.1-dev's layout, which the host reads the same way (reference method "offset":
  a single reference gets ids (1, row, column), as ``FluxKontextPipeline`` gives its image).
- ``qwen_image``: Qwen-Image(-Edit)'s diffusion-model layout (the published diffusers key names that Comfy-Org's
  ``qwen_image_edit_2509`` files keep: ``img_in``, ``txt_norm``, ``txt_in``, ``time_text_embed.*``,
  ``transformer_blocks.N.*``, ``norm_out``, ``proj_out``) at the real widths (3072 = 24 heads x 128, text 3584, 64
  input channels) with 2 transformer blocks, random weights from the factory's pools, through the host's own
  loader; diffusers' ``QwenImageTransformer2DModel`` with the same weights (the host keeps the published names; its
  own LoRA key map, ``transformer.<name>`` -> ``diffusion_model.<name>.weight``, says so). Built in memory: a new
  builder in ``tools/factory`` would change the factory's cache key under everyone's running tests.

One call lays the references out as diffusers' pipelines do: ``FluxKontextPipeline`` appends the reference's packed
tokens after the noisy latent's (ids with first coordinate 1); ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline``
append each reference's tokens and pass ``img_shapes`` [(1, h, w) of the output, then of each reference], which give
RoPE frame index 0, 1, 2, ... and rows/columns centred on each grid. The host gets ``ref_latents=[...]`` in its own
latent shapes (Flux [B, 16, H, W], Qwen-Image [B, 16, 1, H, W]) and its default reference method ("offset" for
FLUX.1-dev-like files, "index" for Qwen-Image). Reference latents are in the model's space on both sides (the host's
``extra_conds`` applies ``process_latent_in``; the pipelines normalise the VAE's latents themselves).

The joint sequence both attentions see (verified in diffusers' ``FluxAttnProcessor``, ``FluxSingleTransformerBlock``,
``QwenDoubleStreamAttnProcessor2_0`` and the host's Flux ``DoubleStreamBlock``/``SingleStreamBlock`` and Qwen
``Attention``): text tokens, then the output image's tokens, then each reference's tokens in order
(``TokenCounts``). ``run_diffusers(..., attention_mask=M)`` adds M ([B or 1, 1, L, L], additive) inside diffusers'
own attention call: Flux's processor passes ``joint_attention_kwargs["attention_mask"]`` to its
``dispatch_attention_fn`` in every block; Qwen's refuses an ``attention_mask`` (it builds one only from the text
padding mask), so ``masked_qwen_processor()`` hands M to that processor's own ``dispatch_attention_fn`` call and
changes nothing else.

Differences between host and diffusers that a caller must respect (both sides agree within 1e-4 otherwise):
- Qwen-Image's text RoPE positions start at max(h//2, w//2) over the token grids of the output and every reference
  in diffusers, of the output alone in the host (0.3.75 and 0.28.1): a reference whose grid is larger than the
  output's in that sense moves diffusers' text positions and not the host's;
- on a token grid of odd height or width, Qwen-Image's centred rows/columns are -(n//2) .. n - 1 - n//2 in the host
  and -(n - n//2) .. n//2 - 1 in diffusers (the pipelines make every grid even: sizes are multiples of 32 px);
- Kontext: ``FluxKontextPipeline`` takes one reference; the host places further ones by offsets, which diffusers
  has no layout for (``run_diffusers`` refuses more than one).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from support.diffusers_twins import flux_twin
from support.flux import call_transformer, image_ids, load_flux, pack, unpack
from tools.factory.dit_models import FLUX_REDUCED
from tools.factory.pool import WeightPools, meta_shapes

QWEN_LAYERS = 2
QWEN_SEED = 71
QWEN_TEXT = 3584  # joint_attention_dim: Qwen2.5-VL-7B's hidden states


@dataclass(frozen=True)
class TokenCounts:
    """Token counts of one call's joint sequence, in the order its attention sees them."""
    text: int
    image: int
    references: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.text + self.image + sum(self.references)

    def spans(self) -> list[slice]:
        """Slices of the joint sequence: text, output image, then each reference."""
        out, start = [], 0
        for n in (self.text, self.image, *self.references):
            out.append(slice(start, start + n))
            start += n
        return out


@dataclass
class EditCall:
    """One transformer call's inputs in the host's shapes: ``x`` the noisy latent (Flux [B, 16, H, W], Qwen-Image
    [B, 16, 1, H, W]), ``t`` [B] the timestep as the host's sampler passes it (sigma, 0..1), ``context`` the text
    tokens, ``refs`` the reference latents (each [B, 16(, 1), h, w]); Flux also ``y`` (CLIP-L pooled) and
    ``guidance``."""
    x: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    refs: list[torch.Tensor] = field(default_factory=list)
    y: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def without_references(self) -> "EditCall":
        return EditCall(self.x, self.t, self.context, [], self.y, self.guidance)


def _grid(latent: torch.Tensor) -> tuple[int, int]:
    h, w = latent.shape[-2:]
    return (h + 1) // 2, (w + 1) // 2  # both models' 2 x 2 patches, a latent padded to even sizes


def token_counts(call: EditCall) -> TokenCounts:
    """(text, output image, each reference) token counts of ``call``, for both models (2 x 2 patches)."""
    rows, cols = _grid(call.x)
    return TokenCounts(call.context.shape[1], rows * cols, tuple(r * c for r, c in map(_grid, call.refs)))


class _Pair:
    """The host's model (``model``, a ModelPatcher) and diffusers' twin (``twin``) with the same weights."""

    def __init__(self, model, twin):
        self.model = model
        self.twin = twin

    def run_host(self, call: EditCall, model=None, **kwargs) -> torch.Tensor:
        """The host's transformer as its sampler calls it (``model`` a patched clone of ``self.model``, if given),
        with ``ref_latents``; ``kwargs`` go to ``diffusion_model`` (``ref_latents_method=...``)."""
        model = model or self.model
        extra = {"y": call.y, "guidance": call.guidance} if call.y is not None else {}
        return call_transformer(model, call.x, call.t, call.context, ref_latents=list(call.refs) or None,
                                cond_or_uncond=[0] * call.x.shape[0], sigma=float(call.t[0]), **extra, **kwargs)

    def run_diffusers(self, call: EditCall, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def run_both(self, call: EditCall, attention_mask: torch.Tensor | None = None):
        """(host output, diffusers output), both in the host's latent shape."""
        return self.run_host(call), self.run_diffusers(call, attention_mask)


def _check_mask(mask: torch.Tensor | None, call: EditCall) -> None:
    if mask is not None:
        n = token_counts(call).total
        assert mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[-2:] == (n, n), (tuple(mask.shape), n)
        assert mask.shape[0] in (1, call.x.shape[0]), tuple(mask.shape)


class Kontext(_Pair):
    """FLUX.1 Kontext: the host's Flux and diffusers' ``FluxTransformer2DModel`` as ``FluxKontextPipeline`` calls it."""

    def run_diffusers(self, call: EditCall, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One call as ``FluxKontextPipeline`` makes it: the reference's packed tokens after the latent's, its ids
        (1, row, column); ``attention_mask`` [B or 1, 1, L, L] (text, image, reference) reaches every block's
        attention through ``joint_attention_kwargs``."""
        if len(call.refs) > 1:
            raise ValueError("FluxKontextPipeline lays out one reference image")
        _check_mask(attention_mask, call)
        h, w = call.x.shape[-2:]
        hidden = torch.cat([pack(call.x), *(pack(r) for r in call.refs)], dim=1)
        ids = torch.cat([image_ids(h // 2, w // 2), *(image_ids(*_grid(r), index=1) for r in call.refs)])
        kwargs = {"attention_mask": attention_mask} if attention_mask is not None else None
        with torch.no_grad():
            out = self.twin(hidden_states=hidden, encoder_hidden_states=call.context, pooled_projections=call.y,
                            timestep=call.t, img_ids=ids, txt_ids=torch.zeros(call.context.shape[1], 3),
                            guidance=call.guidance, joint_attention_kwargs=kwargs).sample
        return unpack(out[:, :(h // 2) * (w // 2)], h, w)

    @staticmethod
    def inputs(seed: int, latent_hw=(8, 12), ref_hws=((8, 12),), batch: int = 1, text_tokens: int = 5,
               t: float = 0.7, guidance: float = 3.5) -> EditCall:
        """Random inputs: latent [B, 16, *latent_hw], a reference latent per ``ref_hws``, T5 tokens, CLIP-L pooled."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 16, *latent_hw, generator=g)
        refs = [torch.randn(batch, 16, *hw, generator=g) for hw in ref_hws]
        context = torch.randn(batch, text_tokens, 4096, generator=g)
        y = torch.randn(batch, 768, generator=g)
        return EditCall(x, torch.full((batch,), t), context, refs, y, torch.full((batch,), guidance))


def kontext(host, models_dir) -> Kontext:
    """FLUX.1 Kontext's stand-in: the factory's ``diffusion_models/flux1_layout.pt`` (``models_dir`` from
    ``need_models``) through the host's loader, and its diffusers twin."""
    model = load_flux(models_dir)
    return Kontext(model, flux_twin(model, FLUX_REDUCED))


def qwen_image_state_dict(layers: int = QWEN_LAYERS, seed: int = QWEN_SEED) -> dict[str, torch.Tensor]:
    """A Qwen-Image(-Edit) diffusion-model file's tensors (the published names, the host's module's shapes at the
    real widths) with ``layers`` transformer blocks: the factory's pools (weights 1/sqrt(fan_in), norms one, biases
    small)."""
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    with torch.device("meta"):
        module = QwenImageTransformer2DModel(num_layers=layers, operations=comfy.ops.disable_weight_init)
    return WeightPools(seed).state_dict(meta_shapes(module))


def qwen_image_twin(model):
    """diffusers' ``QwenImageTransformer2DModel`` (Qwen-Image's settings, the host model's depth) with the host
    model's weights (fp32, eval): diffusers key ``k`` is the host's ``k``, as the host's LoRA key map gives for every
    weight (``transformer.<name>`` -> ``diffusion_model.<name>.weight``); biases keep their names alike."""
    import comfy.lora
    from diffusers import QwenImageTransformer2DModel
    host_sd = model.model.diffusion_model.state_dict()
    layers = len(model.model.diffusion_model.transformer_blocks)
    lora_map = comfy.lora.model_lora_keys_unet(model.model, {})
    twin = QwenImageTransformer2DModel(num_layers=layers)
    state = {}
    for key in twin.state_dict():
        stem, leaf = key.rsplit(".", 1)
        host_key = lora_map[f"transformer.{stem}"].removeprefix("diffusion_model.") if leaf == "weight" else key
        assert host_key == key, (key, host_key)
        state[key] = host_sd[host_key]
    twin.load_state_dict(state, strict=True)
    twin.set_attn_processor(masked_qwen_processor())
    return twin.eval()


class QwenImage(_Pair):
    """Qwen-Image-Edit: the host's Qwen-Image and diffusers' ``QwenImageTransformer2DModel`` as
    ``QwenImageEditPipeline`` (one reference) and ``QwenImageEditPlusPipeline`` (several) call it."""

    def run_diffusers(self, call: EditCall, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One call as the edit pipelines make it: each reference's packed tokens after the latent's, ``img_shapes``
        [(1, h, w) of the output, then of each reference]; ``attention_mask`` [B or 1, 1, L, L] (text, image, each
        reference) reaches every block's attention (``masked_qwen_processor``)."""
        _check_mask(attention_mask, call)
        b, _, frames, h, w = call.x.shape
        assert frames == 1 and all(r.shape[2] == 1 for r in call.refs)
        hidden = torch.cat([pack(call.x[:, :, 0]), *(pack(r[:, :, 0]) for r in call.refs)], dim=1)
        shapes = [[(1, h // 2, w // 2), *((1, *_grid(r)) for r in call.refs)]] * b
        kwargs = {"attention_mask": attention_mask} if attention_mask is not None else None
        with torch.no_grad():
            out = self.twin(hidden_states=hidden, encoder_hidden_states=call.context, encoder_hidden_states_mask=None,
                            timestep=call.t, img_shapes=shapes, attention_kwargs=kwargs).sample
        return unpack(out[:, :(h // 2) * (w // 2)], h, w).unsqueeze(2)

    @staticmethod
    def inputs(seed: int, latent_hw=(8, 12), ref_hws=((8, 12),), batch: int = 1, text_tokens: int = 7,
               t: float = 0.7) -> EditCall:
        """Random inputs: latent [B, 16, 1, *latent_hw], a reference latent [B, 16, 1, h, w] per ``ref_hws``, text
        tokens [B, text_tokens, 3584] (Qwen2.5-VL's hidden states)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 16, 1, *latent_hw, generator=g)
        refs = [torch.randn(batch, 16, 1, *hw, generator=g) for hw in ref_hws]
        context = torch.randn(batch, text_tokens, QWEN_TEXT, generator=g)
        return EditCall(x, torch.full((batch,), t), context, refs)


def qwen_image(host, layers: int = QWEN_LAYERS, seed: int = QWEN_SEED) -> QwenImage:
    """Qwen-Image-Edit's stand-in (``qwen_image_state_dict``) through the host's diffusion-model loader (fp32), and
    its diffusers twin. ``host`` is the fixture (the host's modules imported and configured)."""
    import comfy.sd
    model = comfy.sd.load_diffusion_model_state_dict(qwen_image_state_dict(layers, seed),
                                                     model_options={"dtype": torch.float32})
    assert model is not None and type(model.model).__name__ == "QwenImage", "the host did not detect Qwen-Image"
    return QwenImage(model, qwen_image_twin(model))


@functools.cache
def _masked_qwen_processor_class():
    """``MaskedQwenAttnProcessor``, made on first use (diffusers is imported only by the tests that run it)."""
    from diffusers.models.transformers import transformer_qwenimage as module

    class MaskedQwenAttnProcessor(module.QwenDoubleStreamAttnProcessor2_0):
        """diffusers' ``QwenDoubleStreamAttnProcessor2_0``, unchanged, except that an ``attention_mask`` (additive,
        [B or 1, 1, L, L] over [text, image tokens]) is handed to its own ``dispatch_attention_fn`` call, where the
        processor itself refuses one. Without a mask it is the processor itself."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                     attention_mask=None, image_rotary_emb=None):
            parent = super().__call__
            if attention_mask is None:
                return parent(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, None,
                              image_rotary_emb)
            if encoder_hidden_states_mask is not None:
                raise ValueError("an attention_mask with a text padding mask: combine them into the attention_mask")
            dispatch = module.dispatch_attention_fn

            def masked(query, key, value, attn_mask=None, **kwargs):
                assert attn_mask is None and query.shape[1] == attention_mask.shape[-1]  # [B, L, heads, dim]
                return dispatch(query, key, value, attn_mask=attention_mask.to(query.dtype), **kwargs)
            module.dispatch_attention_fn = masked  # the processor's module-level name, for this one call
            try:
                return parent(attn, hidden_states, encoder_hidden_states, None, None, image_rotary_emb)
            finally:
                module.dispatch_attention_fn = dispatch

    return MaskedQwenAttnProcessor


def masked_qwen_processor():
    """A ``MaskedQwenAttnProcessor``: diffusers' Qwen-Image processor that passes an additive ``attention_mask`` to
    its own attention call."""
    return _masked_qwen_processor_class()()
