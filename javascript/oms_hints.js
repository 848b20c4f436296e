// Tooltips of the One More Step controls. Their words come from the extension's Python side (oms_webui/args.py,
// lib_oms/options.py), carried in a hidden element of the accordion; the WebUI shows titles[text] on elements whose
// text is a key.
(function() {
    let omsHints = null;
    function readHints() {
        if (omsHints === null) {
            const root = typeof gradioApp === "function" ? gradioApp() : document;
            const carrier = root.querySelector("[data-oms-hints]");
            if (carrier) {
                omsHints = JSON.parse(carrier.dataset.omsHints);
            }
        }
        return omsHints;
    }
    // The solver's choices are named like the WebUI's samplers, whose titles ("DDIM": "... best at inpainting") the
    // WebUI would put on them: an element that already has a title is left alone by its tooltip pass.
    function titleSolverChoices() {
        const hints = readHints();
        if (hints === null) {
            return;
        }
        const root = typeof gradioApp === "function" ? gradioApp() : document;
        const choices = root.querySelectorAll('[id$="one_more_step_solver"] span, [id$="one_more_step_solver"] input');
        for (const element of choices) {
            const choice = element.tagName === "INPUT" ? element.value : element.textContent.trim();
            if (choice in hints.choices) {
                element.title = hints.choices[choice];
            }
        }
    }
    function addOmsTitles() {
        const hints = readHints();
        if (hints !== null && typeof titles !== "undefined") {
            Object.assign(titles, hints.labels);
        }
        titleSolverChoices();
    }
    if (typeof onUiLoaded === "function") {
        onUiLoaded(addOmsTitles);
    }
    if (typeof onUiUpdate === "function") {
        onUiUpdate(addOmsTitles);  // before the WebUI's tooltip pass, which runs a second after a change
    }
})();
