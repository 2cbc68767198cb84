"""InstantX's FLUX.1-dev IP-Adapter on the host's Flux transformer equals DiffSynth-Studio's Flux model with it.

diffusers has no implementation of this adapter; DiffSynth-Studio (ModelScope, on PyPI as ``diffsynth``) has one:
its Flux blocks take each block's image K/V (``ipadapter_kwargs_list``) and its ``FluxIpAdapter`` modules make them
(K RMS-normed per head), from its ``MLPProjModel``'s tokens of SigLIP's pooled output. The host model is the
factory's FLUX.1-dev layout (real widths, 2 double- and 1 single-stream blocks) loaded by the host's own loader;
DiffSynth's model gets the same file through DiffSynth's own key converter. Its model files need only torch, einops
and transformers, so they are imported without the package's ``__init__`` (which pulls in its pipelines' modelscope
and video I/O). The adapter's token MLP is checked against DiffSynth's ``MLPProjModel`` on its own (the factory
file's MLP is 16 wide, where the published one's 2304 x 128 x 4096 output layer has 1.2 B parameters).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import types

import pytest
import torch

from support.flux import LATENT_HW, TEXT_TOKENS, inputs  # the XLabs parity's latents (2:3) and conditioning
from tools import factory
from tools.comfy_host import pack_module
from tools.factory import dit_models

pytestmark = pytest.mark.host

CONFIG = dit_models.FLUX_REDUCED
QUERY, OUTPUT = "attn1_patch", "attn1_output_patch"  # the host's attention patches, where its Flux blocks call them
DOUBLES, SINGLES = CONFIG["depth"], CONFIG["depth_single_blocks"]


def diffsynth(module: str):
    """``diffsynth.<module>``, imported without running the package's ``__init__``."""
    if "diffsynth" not in sys.modules:
        spec = importlib.util.find_spec("diffsynth")
        package = types.ModuleType("diffsynth")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["diffsynth"] = package
    return importlib.import_module(f"diffsynth.{module}")


def diffsynth_twin(file_sd: dict):
    """DiffSynth's FluxDiT with the file's weights (fp32, eval), through DiffSynth's converter of Black Forest Labs'
    layout (the file's; newer hosts name their modules' RMSNorm scales otherwise); built on the meta device, as it
    always makes 38 single-stream blocks, then cut to the file's."""
    flux_dit = diffsynth("models.flux_dit")
    converter = diffsynth("utils.state_dict_converters.flux_dit").FluxDiTStateDictConverter
    with torch.device("meta"):
        twin = flux_dit.FluxDiT(num_blocks=DOUBLES)
    twin.single_blocks = twin.single_blocks[:SINGLES]
    twin.to_empty(device="cpu")
    twin.load_state_dict(converter(file_sd), strict=True)
    return twin.eval()


def run_diffsynth(twin, x, t, context, y, guidance, block_kwargs=None):
    """One prediction of DiffSynth's model as its Flux pipeline's model function makes it (no ControlNet, tiles or
    entities); ``block_kwargs[i]``: block i's IP-Adapter arguments (blocks numbered double-stream first)."""
    block_kwargs = block_kwargs or {}
    conditioning = twin.time_embedder(t * 1000, x.dtype) + twin.pooled_text_embedder(y)
    conditioning = conditioning + twin.guidance_embedder(guidance * 1000, x.dtype)
    image_ids = twin.prepare_image_ids(x)
    hidden = twin.x_embedder(twin.patchify(x))
    prompt = twin.context_embedder(context)
    rope = twin.pos_embedder(torch.cat((torch.zeros(x.shape[0], context.shape[1], 3), image_ids), dim=1))
    with torch.no_grad():
        for i, block in enumerate(twin.blocks):
            hidden, prompt = block(hidden, prompt, conditioning, rope, None, ipadapter_kwargs_list=block_kwargs.get(i))
        hidden = torch.cat([prompt, hidden], dim=1)
        for i, block in enumerate(twin.single_blocks):
            hidden, prompt = block(hidden, prompt, conditioning, rope, None,
                                   ipadapter_kwargs_list=block_kwargs.get(DOUBLES + i))
        hidden = twin.final_proj_out(twin.final_norm_out(hidden[:, prompt.shape[1]:], conditioning))
    return twin.unpatchify(hidden, *x.shape[-2:])


class Flux:
    """The host's Flux model, its DiffSynth twin, and the adapter on both."""

    def __init__(self, models_dir):
        import comfy.sd
        import comfy.utils
        sd = comfy.utils.load_torch_file(str(models_dir / "diffusion_models" / factory.FLUX_FILE))
        self.twin = diffsynth_twin(sd)  # before the host's loader, which may rename the dict's keys
        self.model = comfy.sd.load_diffusion_model_state_dict(sd)
        self.encode = pack_module("nodes.ipadapter_encode")
        self.apply = pack_module("nodes.ipadapter_apply")
        self.options = pack_module("ipadapter_core.apply_options").ApplyOptions

    def adapter(self, seed: int, tmp_path):
        """Our LoadedAdapter for an InstantX file (its published layout, a torch pickle as published)."""
        path = tmp_path / f"FLUX.1-dev-IP-Adapter-{seed}.bin"
        factory.write_state_dict(dit_models.instantx_flux_adapter(seed, DOUBLES + SINGLES, 16), path)
        return self.encode.load(str(path))

    def patch(self, model, adapter, cond, uncond, weight, **inputs):
        """``model`` patched as the Apply nodes patch it, from pooled SigLIP embeds [1, 1152]."""
        cond_tokens, uncond_tokens = self.encode.image_tokens(adapter, cond, uncond)
        return self.apply.apply_tokens(model, adapter, cond_tokens, uncond_tokens,
                                       self.options.from_inputs(weight, **inputs))

    def run_host(self, model, x, t, context, y, guidance, cond_or_uncond, sigma=0.5):
        options = dict(model.model_options["transformer_options"], cond_or_uncond=cond_or_uncond,
                       sigmas=torch.full((1,), sigma), wrappers=model.wrappers)
        with torch.no_grad():
            return model.model.diffusion_model(x, t, context, y=y, guidance=guidance, transformer_options=options)


def applied_patch(model):
    """Our patch object on ``model`` (attention patches or block patches, as the host's blocks allow)."""
    patch = pack_module("nodes.patch.flux_instantx")
    return patch.applied(model.model_options["transformer_options"], patch.InstantXTerms)


def reference_kv(adapter, tokens_per_row: list[torch.Tensor], scales: list[float], rows=None) -> dict[int, dict]:
    """DiffSynth's IP-Adapter arguments per block: its IpAdapterModule (the file's to_k_ip / to_v_ip) applied to
    each batch row's image tokens [1, T, 4096], at ``scales[block]``; ``rows(block)``: the mask's rows there."""
    module_class = diffsynth("models.flux_ipadapter").IpAdapterModule
    tokens = torch.cat(tokens_per_row)
    kwargs = {}
    for block in range(DOUBLES + SINGLES):
        module = module_class(24, 128, 4096)
        module.load_state_dict({f"to_{kind}_ip.weight": adapter.file.ip_adapter[f"{block}.to_{kind}_ip.weight"]
                                for kind in "kv"}, strict=True)
        with torch.no_grad():
            ip_k, ip_v = module(tokens)
        kwargs[block] = {"ip_k": ip_k, "ip_v": ip_v, "scale": scales[block], "rows": rows and rows(block)}
    return kwargs


def together(*per_adapter: dict[int, dict]) -> dict[int, dict]:
    """Several adapters' per-block arguments as one (see ``diffsynth_adjusted``)."""
    return {block: {"adapters": [kwargs[block] for kwargs in per_adapter]} for block in per_adapter[0]}


def diffsynth_adjusted(monkeypatch) -> None:
    """The changes to DiffSynth here, none in the attention math:
    - its single-stream block hands the IP-Adapter its query after RoPE, where InstantX's own attention processor
      (and Shakker-Labs' ComfyUI port of it) attend with the query before RoPE in both kinds of block, as
      DiffSynth's double-stream block does: the single block's pre-RoPE query is kept as its ``apply_rope``
      receives it and given to the IP-Adapter in place of the rotated one;
    - it takes one adapter per block: ``adapters`` (a list of its per-adapter arguments) sums their terms, each
      optionally multiplied by ``rows`` [N, 1] (a mask's region of the block's rows)."""
    flux_dit = diffsynth("models.flux_dit")
    block_class, interact = flux_dit.FluxSingleTransformerBlock, flux_dit.interact_with_ipadapter
    rope = block_class.apply_rope
    kept = []

    def apply_rope(self, xq, xk, freqs_cis):
        kept[:] = [xq]
        return rope(self, xq, xk, freqs_cis)

    def interact_with_ipadapter(hidden_states, q, adapters=None, **kwargs):
        query = kept.pop() if kept and kept[0].shape == q.shape else q
        kept.clear()
        for adapter in adapters or [kwargs]:
            rows = adapter.get("rows")
            term = interact(torch.zeros_like(hidden_states), query, adapter["ip_k"], adapter["ip_v"], adapter["scale"])
            hidden_states = hidden_states + (term if rows is None else term * rows)
        return hidden_states

    monkeypatch.setattr(block_class, "apply_rope", apply_rope)
    monkeypatch.setattr(flux_dit, "interact_with_ipadapter", interact_with_ipadapter)


@pytest.fixture(scope="module")
def flux(host, need_models):
    with pytest.MonkeyPatch.context() as monkeypatch:
        diffsynth_adjusted(monkeypatch)
        yield Flux(need_models(f"diffusion_models/{factory.FLUX_FILE}"))


def pooled(g, count: int = 2):
    return [torch.randn(1, 1152, generator=g) for _ in range(count)]


def test_plain_models_agree(flux):
    """DiffSynth's converter and the random weights give the host's very transformer: the baseline here."""
    x, t, context, y, guidance, _ = inputs(1)
    torch.testing.assert_close(flux.run_host(flux.model, x, t, context, y, guidance, [0]),
                               run_diffsynth(flux.twin, x, t, context, y, guidance), rtol=0, atol=1e-4)


def test_the_token_mlp_is_diffsynths(flux):
    """Our projection of the file's image_proj equals DiffSynth's MLPProjModel (its published widths, 2 tokens)."""
    projection_class = diffsynth("models.flux_ipadapter").MLPProjModel
    theirs = projection_class(cross_attention_dim=4096, id_embeddings_dim=1152, num_tokens=2).eval()
    build = pack_module("ipadapter_core.projection").build_projection
    variant = dataclasses.replace(pack_module("ipadapter_core.variants").BY_NAME["instantx_flux"], tokens=2)
    ours = build(variant, dict(theirs.state_dict()))
    embeds = torch.randn(3, 1152)
    with torch.no_grad():
        torch.testing.assert_close(ours(embeds), theirs(embeds), rtol=0, atol=1e-5)


@pytest.mark.parametrize("weight", [1.0, 0.4])
def test_one_adapter_matches_diffsynth_in_flux_single_pass(flux, tmp_path, weight):
    x, t, context, y, guidance, g = inputs(1, 1)
    adapter = flux.adapter(11, tmp_path)
    assert adapter.file.variant.name == "instantx_flux" and len(adapter.file.layer_widths) == DOUBLES + SINGLES
    cond, uncond = pooled(g)
    ours = flux.run_host(flux.patch(flux.model, adapter, cond, uncond, weight), x, t, context, y, guidance, [0])
    plain = flux.run_host(flux.model, x, t, context, y, guidance, [0])
    tokens, _ = flux.encode.image_tokens(adapter, cond, uncond)
    theirs = run_diffsynth(flux.twin, x, t, context, y, guidance,
                           reference_kv(adapter, [tokens], [weight] * (DOUBLES + SINGLES)))
    assert (ours - plain).abs().max() > 100 * (ours - theirs).abs().max()  # the adapter really moved the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_real_cfg_gives_the_negative_side_the_uncond_tokens(flux, tmp_path):
    """True CFG (a negative prompt, cfg > 1): the uncond chunk gets the negative image's tokens."""
    x, t, context, y, guidance, g = inputs(2, 2)
    adapter = flux.adapter(21, tmp_path)
    cond, negative = pooled(g)
    patched = flux.patch(flux.model, adapter, cond, negative, 0.8)
    ours = flux.run_host(patched, x, t, context, y, guidance, [1, 0])
    cond_tokens, negative_tokens = flux.encode.image_tokens(adapter, cond, negative)
    theirs = run_diffsynth(flux.twin, x, t, context, y, guidance,
                           reference_kv(adapter, [negative_tokens, cond_tokens], [0.8] * (DOUBLES + SINGLES)))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    swapped = flux.run_host(patched, x.flip(0), t, context.flip(0), y.flip(0), guidance, [0, 1])
    torch.testing.assert_close(swapped.flip(0), ours, rtol=0, atol=1e-5)  # chosen by the chunk, not its position


def test_the_default_negative_is_the_projection_of_zeros(flux, tmp_path):
    """As DiffSynth's Flux pipeline makes it: the MLP's tokens of an all-zero pooled output."""
    adapter = flux.adapter(22, tmp_path)
    cond = pooled(torch.Generator().manual_seed(3), 1)[0]
    _, uncond = flux.encode.image_tokens(adapter, cond, flux.encode.neutral_embeds(adapter, None, cond))
    with torch.no_grad():
        torch.testing.assert_close(uncond, adapter.projection(torch.zeros(1, 1152)), rtol=0, atol=0)


def test_per_block_weights_match_diffsynth_per_block_scales(flux, tmp_path):
    """Written weights per block (double-stream blocks first, then single-stream ones) and a curve over them."""
    x, t, context, y, guidance, g = inputs(1, 3)
    adapter = flux.adapter(31, tmp_path)
    cond, uncond = pooled(g)
    tokens, _ = flux.encode.image_tokens(adapter, cond, uncond)
    patched = flux.patch(flux.model, adapter, cond, uncond, 1.2, layer_weights="0:0.25, 1:1, 2:0.5")
    theirs = run_diffsynth(flux.twin, x, t, context, y, guidance, reference_kv(adapter, [tokens], [0.3, 1.2, 0.6]))
    torch.testing.assert_close(flux.run_host(patched, x, t, context, y, guidance, [0]), theirs, rtol=0, atol=1e-4)
    eased = flux.patch(flux.model, adapter, cond, uncond, 1.2, weight_type="ease out")
    scales = [1.2 * 0.05, 1.2 * (0.05 + 0.95 / 3), 1.2 * (0.05 + 0.95 * 2 / 3)]
    theirs = run_diffsynth(flux.twin, x, t, context, y, guidance, reference_kv(adapter, [tokens], scales))
    torch.testing.assert_close(flux.run_host(eased, x, t, context, y, guidance, [0]), theirs, rtol=0, atol=1e-4)


def test_two_adapters_compose_like_their_summed_terms(flux, tmp_path):
    """Two chained Apply nodes (128 tokens each: one group, one attention call per block)."""
    x, t, context, y, guidance, g = inputs(2, 4)
    first, second = flux.adapter(41, tmp_path), flux.adapter(42, tmp_path)
    e1, e2 = pooled(g), pooled(g)
    patched = flux.patch(flux.patch(flux.model, first, *e1, 0.9), second, *e2, 0.5)
    patch = applied_patch(patched)
    assert len(patch.adapters) == 2 and len(patch.groups[0]) == 1
    ours = flux.run_host(patched, x, t, context, y, guidance, [1, 0])
    references = []
    for adapter, (cond, uncond), weight in ((first, e1, 0.9), (second, e2, 0.5)):
        cond_tokens, uncond_tokens = flux.encode.image_tokens(adapter, cond, uncond)
        references.append(reference_kv(adapter, [uncond_tokens, cond_tokens], [weight] * (DOUBLES + SINGLES)))
    theirs = run_diffsynth(flux.twin, x, t, context, y, guidance, together(*references))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_a_mask_limits_the_image_to_its_region_of_the_token_grid(flux, tmp_path):
    """A mask over the left third of a 2:3 latent: the term on its region of the 4 x 6 image tokens (columns 0-1),
    in every block; a single-stream block's text rows get no term from a masked adapter."""
    x, t, context, y, guidance, g = inputs(2, 5)
    adapter = flux.adapter(51, tmp_path)
    cond, uncond = pooled(g)
    mask = torch.zeros(1, 48, 72)  # an image-sized mask: any size and aspect ratio maps onto the grid
    mask[:, :, :24] = 1.0
    ours = flux.run_host(flux.patch(flux.model, adapter, cond, uncond, 1.0, attn_mask=mask), x, t, context, y,
                         guidance, [1, 0])
    grid = torch.zeros(LATENT_HW[0] // 2, LATENT_HW[1] // 2)
    grid[:, :2] = 1.0
    image_rows = grid.reshape(-1, 1)
    cond_tokens, uncond_tokens = flux.encode.image_tokens(adapter, cond, uncond)
    theirs = run_diffsynth(flux.twin, x, t, context, y, guidance, reference_kv(
        adapter, [uncond_tokens, cond_tokens], [1.0] * (DOUBLES + SINGLES),
        lambda block: image_rows if block < DOUBLES else torch.cat([torch.zeros(TEXT_TOKENS, 1), image_rows])))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    unmasked = flux.run_host(flux.patch(flux.model, adapter, cond, uncond, 1.0), x, t, context, y, guidance, [1, 0])
    assert (ours - unmasked).abs().max() > 1e-2


def test_weight_zero_is_bit_identical_and_the_input_model_is_untouched(flux, tmp_path):
    x, t, context, y, guidance, g = inputs(1, 6)
    before = flux.run_host(flux.model, x, t, context, y, guidance, [0])
    adapter = flux.adapter(61, tmp_path)
    zero = flux.patch(flux.model, adapter, *pooled(g), 0.0)
    assert torch.equal(flux.run_host(zero, x, t, context, y, guidance, [0]), before)
    options = flux.model.model_options["transformer_options"]
    assert "patches_replace" not in options and "optimized_attention_override" not in options
    assert torch.equal(flux.run_host(flux.model, x, t, context, y, guidance, [0]), before)


def test_the_detection_says_what_the_hosts_blocks_call(flux):
    """``calls_attention_patches`` (which reads the blocks' code) agrees with what the host's blocks do: a pair of
    recording attention patches runs once per block where it says yes, never where it says no."""
    module = pack_module("nodes.patch.flux_instantx")
    calls = []
    recording = flux.model.clone()
    recording.set_model_attn1_patch(lambda q, k, v, pe, attn_mask, extra_options: calls.append(QUERY) or {})
    recording.set_model_attn1_output_patch(lambda attn, extra_options: calls.append(OUTPUT) or attn)
    x, t, context, y, guidance, _ = inputs(1)
    flux.run_host(recording, x, t, context, y, guidance, [0])
    detected = module.calls_attention_patches(flux.model.get_model_object("diffusion_model"))
    assert calls == ([QUERY, OUTPUT] * (DOUBLES + SINGLES) if detected else [])


def test_where_the_blocks_call_attention_patches_ours_run_after_another_packs(flux, tmp_path):
    """Where the host's Flux blocks call ``attn1_patch`` and ``attn1_output_patch``, the adapters are those two patches
    (no attention override, no block patch): another pack's, registered before ours, still run in every block, and
    ours too (equal to DiffSynth); a second Apply extends our patches in their places."""
    module = pack_module("nodes.patch.flux_instantx")
    if not module.calls_attention_patches(flux.model.get_model_object("diffusion_model")):
        pytest.skip("this host's Flux blocks call no attention patches: the block patches run (the tests above)")
    calls = []

    def other_query(q, k, v, pe, attn_mask, extra_options):
        calls.append((QUERY, extra_options["block_type"], extra_options["block_index"], tuple(q.shape)))
        return {}

    def other_output(attn, extra_options):
        calls.append((OUTPUT, extra_options["block_type"], extra_options["block_index"], tuple(attn.shape)))
        return attn

    other = flux.model.clone()
    other.set_model_attn1_patch(other_query)
    other.set_model_attn1_output_patch(other_output)
    x, t, context, y, guidance, g = inputs(2, 7)
    first, second = flux.adapter(71, tmp_path), flux.adapter(72, tmp_path)
    e1, e2 = pooled(g), pooled(g)
    patched = flux.patch(flux.patch(other, first, *e1, 0.7), second, *e2, 0.4)
    options = patched.model_options["transformer_options"]
    assert "optimized_attention_override" not in options and "dit" not in options.get("patches_replace", {})
    patch = applied_patch(patched)
    assert len(patch.adapters) == 2
    assert options["patches"][QUERY] == [other_query, patch.query]
    assert options["patches"][OUTPUT] == [other_output, patch.output]
    ours = flux.run_host(patched, x, t, context, y, guidance, [1, 0])
    rows = TEXT_TOKENS + LATENT_HW[0] * LATENT_HW[1] // 4
    assert calls == [(kind, block, index, shape) for block, count in (("double", DOUBLES), ("single", SINGLES))
                     for index in range(count)
                     for kind, shape in ((QUERY, (2, 24, rows, 128)), (OUTPUT, (2, rows, 3072)))]
    references = []
    for adapter, (cond, uncond), weight in ((first, e1, 0.7), (second, e2, 0.4)):
        cond_tokens, uncond_tokens = flux.encode.image_tokens(adapter, cond, uncond)
        references.append(reference_kv(adapter, [uncond_tokens, cond_tokens], [weight] * (DOUBLES + SINGLES)))
    theirs = run_diffsynth(flux.twin, x, t, context, y, guidance, together(*references))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
