// Shows the text that the sdti nodes return in their "ui" (ComfyUI sends it with the
// "executed" event; its frontend draws images but not ui.text). The text is drawn below
// the node's widgets rather than put into a widget, so it never becomes an input that is
// saved with the workflow or sent with the next queue (that would change the node's
// cache key and run it again).
import { app } from "../../scripts/app.js";

const NODES = new Set(["SDTI_TrainEmbedding", "SDTI_ConvertEmbedding"]);
const LINE = 16;

app.registerExtension({
    name: "sdti.ShowResult",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!NODES.has(nodeData?.name)) {
            return;
        }
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            if (!Array.isArray(message?.text)) {
                return;
            }
            this.sdtiLines = message.text.join("\n").split("\n");
            const [width, height] = this.computeSize();
            this.setSize([Math.max(this.size[0], width), Math.max(this.size[1], height + this.sdtiLines.length * LINE + 8)]);
            this.setDirtyCanvas(true, true);
        };
        const onDrawForeground = nodeType.prototype.onDrawForeground;
        nodeType.prototype.onDrawForeground = function (ctx) {
            const drawn = onDrawForeground?.apply(this, arguments);
            if (this.sdtiLines && !this.flags?.collapsed) {
                const top = this.size[1] - this.sdtiLines.length * LINE;
                ctx.save();
                ctx.font = "12px monospace";
                ctx.fillStyle = "#9c9";
                this.sdtiLines.forEach((line, i) => ctx.fillText(line, 10, top + i * LINE, this.size[0] - 20));
                ctx.restore();
            }
            return drawn;
        };
    },
});
