"""ComfyUI glue: the pack's extension, its node list and its model folders."""
from comfy_api.latest import ComfyExtension, io

from . import edit_nodes, embeds_nodes, faceid_nodes, ipadapter_nodes, region_nodes


class ImagePromptEditExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        ipadapter_nodes.register_model_folder()
        return [*ipadapter_nodes.NODES, *embeds_nodes.NODES, *faceid_nodes.NODES, *region_nodes.NODES,
                *edit_nodes.NODES]
