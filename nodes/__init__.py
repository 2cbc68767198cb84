"""ComfyUI glue: the pack's extension, its node list (and ComfyUI_IPAdapter_plus's ids, run by ours), its model
folders and its migration routes."""
from aiohttp import web
from comfy_api.latest import ComfyExtension, io

from ..ipadapter_core.migrate import TABLE_PATH, migrate
from . import (apply_nodes, compat_nodes, edit_nodes, embeds_nodes, faceid_nodes, loader_nodes, reference_nodes,
               region_nodes, schedule_nodes)
from .combo_check import with_named_combo_errors
from .host_features import apply_host_features
from .input_checks import with_checked_values

_routes_added = False


def register_migration_routes() -> None:
    """GET /image_prompt/migration_table and POST /image_prompt/migrate (a workflow -> the migrated workflow
    and its report) for web/migrate_ipadapter_plus.js; only when a server runs (not in in-process hosts)."""
    global _routes_added
    from server import PromptServer
    if _routes_added or getattr(PromptServer, "instance", None) is None:
        return
    _routes_added = True
    routes = PromptServer.instance.routes

    @routes.get("/image_prompt/migration_table")
    async def migration_table(request):
        return web.FileResponse(TABLE_PATH)

    @routes.post("/image_prompt/migrate")
    async def migrate_workflow(request):
        try:
            migrated, report = migrate(await request.json())
        except ValueError as err:
            return web.json_response({"error": str(err)}, status=400)
        return web.json_response({"workflow": migrated, "report": [
            {"node": line.where, "from": line.source, "to": line.target, "status": line.status, "text": str(line)}
            for line in report]})


def our_nodes() -> list[type[io.ComfyNode]]:
    return [*loader_nodes.NODES, *apply_nodes.NODES, *embeds_nodes.NODES, *faceid_nodes.NODES, *region_nodes.NODES,
            *schedule_nodes.NODES, *edit_nodes.NODES, *reference_nodes.NODES]


class ImagePromptEditExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_migration_routes()
        loader_nodes.register_model_folder()
        ours = await apply_host_features(our_nodes())
        return with_checked_values(with_named_combo_errors([*ours, *compat_nodes.compatible_nodes(ours)]))
