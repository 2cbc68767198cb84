"""Legacy group nodes of a UI workflow (``extra.groupNodes``): their definitions' inner nodes become ours."""
from __future__ import annotations

from .table import MigrationTable
from .ui_graph import UiGraphMigration


def migrate_group_nodes(table: MigrationTable, group_nodes: dict, report: list) -> None:
    """Legacy group nodes: a definition's inner nodes are addressed by position, its links are
    [origin index, origin slot, target index, target slot, origin id, type], its external outputs
    [index, slot, type]. The values on its instances are not rewritten (the report says so)."""
    for name, definition in group_nodes.items():
        nodes, links = definition.get("nodes", []), definition.get("links", [])
        had_id = [("id" in node, node.get("id")) for node in nodes]
        for index, node in enumerate(nodes):
            node["id"] = index
        fields = [{"id": index, "origin_id": link[0], "origin_slot": link[1], "target_id": link[2],
                   "target_slot": link[3], "type": link[5] if len(link) > 5 else None}
                  for index, link in enumerate(links)]
        migration = UiGraphMigration(table, {"nodes": nodes, "links": fields}, f"group node '{name}' ", report,
                                     unlink=False)
        lines = len(report)
        migration.run()
        for line in report[lines:]:
            if line.target:
                line.differences.append("inside a group node: check the widget values on its instances")
        definition["links"] = [[f["origin_id"], f["origin_slot"], f["target_id"], f["target_slot"],
                                *links[f["id"]][4:5], f["type"]] for f in migration.graph["links"]]
        for external in definition.get("external", []):
            if len(external) == 3 and isinstance(external[0], int) and isinstance(external[1], int):
                external[1] = migration.maps.outputs.get(external[0], {}).get(external[1], external[1])
                external[2] = table.types.get(external[2], external[2])
        for node, (present, value) in zip(nodes, had_id):
            if present:
                node["id"] = value
            else:
                del node["id"]
