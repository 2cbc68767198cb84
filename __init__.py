"""ComfyUI entry point of the image-prompt (IP-Adapter) and instruction-edit (InstructPix2Pix) node pack."""

WEB_DIRECTORY = "./web"  # the frontend extension that offers to migrate ComfyUI_IPAdapter_plus graphs


async def comfy_entrypoint():
    """The pack's V3 extension (imported here, so that importing the pack alone needs no host)."""
    from .nodes import ImagePromptEditExtension
    return ImagePromptEditExtension()
