// The 4D player inside MV4D Preview 4D nodes (ComfyUI frontend extension).
//
// When the node has run, its UI output names the .mv4dweb file it wrote to the temp folder
// ({"mv4d_player": [{filename, subfolder, type}]}); the player fetches it through the server's /view, by the
// URL api.apiURL builds, so it follows the app's api base (a --listen server on another machine, a reverse
// proxy under a sub-path) and never asks any other host.
//
// Only what ComfyUI frontends 1.27 to 1.47 all have is used: app.registerExtension, beforeRegisterNodeDef,
// onNodeCreated / onExecuted / onRemoved, node.addDOMWidget, api.apiURL (the scripts/*.js shims).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { Mv4dPlayer } from "./mv4d_player.js";

const PLAYER_NODES = ["MV4D_Preview4D"];
const MIN_HEIGHT = 320;

export function viewUrl(entry) {
    const query = new URLSearchParams({ filename: entry.filename, subfolder: entry.subfolder ?? "", type: entry.type ?? "temp" });
    return api.apiURL(`/view?${query}`);
}

app.registerExtension({
    name: "mv4d.preview4d",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!PLAYER_NODES.includes(nodeData.name)) return;

        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const result = onNodeCreated?.apply(this, arguments);
            const root = document.createElement("div");
            this.mv4dPlayer = new Mv4dPlayer(root);
            const widget = this.addDOMWidget("mv4d_player", "mv4d_player", root, {
                serialize: false, hideOnZoom: false, getMinHeight: () => MIN_HEIGHT,
            });
            widget.serialize = false;  // nothing of the player goes into the workflow or the prompt
            this.setSize([Math.max(this.size[0], 440), Math.max(this.size[1], MIN_HEIGHT + 120)]);
            return result;
        };

        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (output) {
            onExecuted?.apply(this, arguments);
            const entry = output?.mv4d_player?.[0];
            if (entry && this.mv4dPlayer) this.mv4dPlayer.load(viewUrl(entry), entry.filename);
        };

        const onRemoved = nodeType.prototype.onRemoved;
        nodeType.prototype.onRemoved = function () {
            this.mv4dPlayer?.destroy();
            return onRemoved?.apply(this, arguments);
        };
    },
});
