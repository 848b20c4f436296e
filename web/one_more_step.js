// What a One More Step node did in its last run (its summary, or "One More Step skipped: why"), shown in the node.
// The nodes send it as their "text" output (oms_comfyui/nodes.py, ui_text); ComfyUI's frontend shows such text only
// for its own nodes, so this script gives ours a read-only text box and fills it each time the node runs.
// ComfyUI loads it from the pack's WEB_DIRECTORY (the root __init__.py).
import { app } from "../../scripts/app.js";

const NODES_WITH_TEXT = ["OneMoreStep", "OneMoreStepNoise"];  // the node_ids whose execute returns ui text
const TEXT_WIDGET = "oms_text";
// Not the frontend's "customtext": in its Vue node design that type is drawn as an editable text input of its own,
// while an unknown type shows this element as it is.
const TEXT_WIDGET_TYPE = "one_more_step_text";

function addTextBox(node) {
    const box = document.createElement("textarea");
    box.className = "comfy-multiline-input one-more-step-text";  // the frontend's look for multiline text
    box.readOnly = true;
    box.placeholder = "What One More Step did shows here after a run";
    // Four lines, for a summary that names module, text encoder, prompt, CFG and solver: the Vue node design sizes
    // the box by its rows, the classic canvas by the widget's height.
    box.rows = 4;
    const widget = node.addDOMWidget(TEXT_WIDGET, TEXT_WIDGET_TYPE, box, {
        getValue: () => box.value,
        setValue: (text) => { box.value = text; },
        getMinHeight: () => 70,
        serialize: false,  // not an input of the node: never sent with the prompt
    });
    widget.serialize = false;  // nor saved in the workflow, where its value would shift the inputs' saved values
    return widget;
}

// The frontend sizes a new node before extensions add widgets to it, and restores a saved node at the size it was
// saved with, maybe from before it had the box: either can be too small to show the box.
function fitContent(node) {
    const [width, height] = node.computeSize();
    if (node.size[0] < width || node.size[1] < height) {
        node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
    }
}

function showText(node, text) {
    node.widgets.find((widget) => widget.name === TEXT_WIDGET).value = text;
    fitContent(node);
    node.setDirtyCanvas(true, true);
}

app.registerExtension({
    name: "OneMoreStep.NodeText",
    beforeRegisterNodeDef(nodeType, nodeData) {
        if (!NODES_WITH_TEXT.includes(nodeData.name)) {
            return;
        }
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const result = onNodeCreated?.apply(this, arguments);
            addTextBox(this);
            fitContent(this);
            return result;
        };
        // Each run starts blank: a node that is bypassed, or not reached, keeps no text of an earlier run.
        const onExecutionStart = nodeType.prototype.onExecutionStart;
        nodeType.prototype.onExecutionStart = function () {
            const result = onExecutionStart?.apply(this, arguments);
            showText(this, "");
            return result;
        };
        // ComfyUI sends the text again when it re-uses the node's cached output, so every run that uses it shows it.
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (output) {
            const result = onExecuted?.apply(this, arguments);
            if (output?.text) {
                showText(this, [].concat(output.text).join("\n"));
            }
            return result;
        };
    },
});
