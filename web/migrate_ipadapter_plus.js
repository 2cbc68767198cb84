// Offers to migrate a graph built with ComfyUI_IPAdapter_plus when it is opened and that pack is not
// installed: its nodes become this pack's (python -m ipadapter_core.migrate does the same from the shell).
// Declined, the graph opens with that pack's node ids as this pack runs them (nodes/compat_nodes.py), or with
// missing nodes when those are switched off.
// The node types come from the migration table; the migration itself runs on the server, which answers
// with the migrated graph and one report line per node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TABLE_ROUTE = "/image_prompt/migration_table";
const MIGRATE_ROUTE = "/image_prompt/migrate";
let tableTypes = null;

async function migratableTypes() {
    if (tableTypes === null) {
        const response = await api.fetchApi(TABLE_ROUTE);
        tableTypes = response.ok ? new Set(Object.keys((await response.json()).nodes)) : new Set();
    }
    return tableTypes;
}

// Whether that pack's node type is missing, or registered by this pack (the module of its own nodes).
function notThatPacks(type) {
    const registered = LiteGraph.registered_node_types[type];
    const ours = LiteGraph.registered_node_types["ImagePromptApply"]?.nodeData?.python_module;
    return !registered || (ours !== undefined && registered.nodeData?.python_module === ours);
}

// That pack's node types in a graph (subgraph definitions included) that this pack can migrate.
function migratableIn(graphData, types) {
    const graphs = [graphData, ...(graphData?.definitions?.subgraphs ?? [])];
    const found = new Set();
    for (const graph of graphs) {
        for (const node of graph?.nodes ?? []) {
            if (types.has(node.type) && notThatPacks(node.type)) found.add(node.type);
        }
    }
    return [...found].sort();
}

// The loader holds references to the graph object and its subgraph definitions: change them in place.
function replaceInPlace(target, source) {
    for (const key of Object.keys(target)) delete target[key];
    Object.assign(target, source);
}

function showReport(report) {
    const notSupported = report.filter((line) => line.status === "not supported").length;
    const summary = `Migrated ${report.length} ComfyUI_IPAdapter_plus node(s)` +
        (notSupported ? `, ${notSupported} with something not supported` : "");
    const detail = report.map((line) => line.text).join("\n");
    console.info(`${summary}\n${detail}`);
    const toast = app.extensionManager?.toast;
    if (toast) {
        toast.add({ severity: notSupported ? "warn" : "info", summary, detail, life: 15000 });
    }
}

app.registerExtension({
    name: "image_prompt.migrate_ipadapter_plus",
    async beforeConfigureGraph(graphData) {
        const types = migratableIn(graphData, await migratableTypes());
        if (!types.length) return;
        const question = `This workflow uses ComfyUI_IPAdapter_plus nodes (that pack is not installed):\n` +
            `${types.join(", ")}\n\nReplace them with this pack's IP-Adapter nodes? ` +
            `(The console and a notice list what changes.)`;
        if (!window.confirm(question)) return;
        const response = await api.fetchApi(MIGRATE_ROUTE, {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify(graphData),
        });
        const answer = await response.json();
        if (!response.ok) {
            window.alert(`The migration failed: ${answer.error ?? response.statusText}`);
            return;
        }
        const subgraphs = graphData.definitions?.subgraphs ?? [];
        const migratedSubgraphs = answer.workflow.definitions?.subgraphs ?? [];
        subgraphs.forEach((subgraph, index) => replaceInPlace(subgraph, migratedSubgraphs[index]));
        if (subgraphs.length) answer.workflow.definitions.subgraphs = subgraphs;
        replaceInPlace(graphData, answer.workflow);
        showReport(answer.report);
    },
});
