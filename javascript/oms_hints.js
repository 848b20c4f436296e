// Tooltips of the One More Step controls: the WebUI shows titles[text] on elements whose text is a key.
(function() {
    const omsTitles = {
        "One More Step": "Start sampling from the OMS-corrected latent (Hu et al., CVPR 2024): images as dark or as bright as the prompt asks. Applies to txt2img (first pass) and to inpainting from latent noise/nothing at denoising 1.",
        "OMS module": "The OMS module for the loaded checkpoint's latent space. Automatic: the one set in Settings > One More Step, else the first module found for SD1.x/SD2.x or SDXL.",
        "OMS prompt": "What the OMS step reads instead of each image's own prompt, e.g. only the lighting: \"night, dark\". Empty: each image's prompt (prompt editing at its first step, emphasis and LoRA tags removed).",
        "OMS negative prompt": "The unconditional prompt of OMS CFG (used only when OMS CFG is not 1). Empty as released.",
        "OMS CFG": "Guidance of the OMS step: 1 as released (one network pass); above 1 pushes brightness and colour further toward the OMS prompt, below 1 toward the negative.",
        "OMS solver": "SDE: as released, fresh noise from the seed (composition changes). DDIM: keeps the seed's own noise, so the composition of the image without OMS is largely kept.",
    };
    // The solver's choices are named like the WebUI's samplers, whose titles ("DDIM": "... best at inpainting") the
    // WebUI would put on them: an element that already has a title is left alone by its tooltip pass.
    const solverTitles = {
        "SDE": "As released: x_T = sqrt(a)*x0 + sqrt(1-a)*z with fresh noise z from the seed; the composition changes.",
        "DDIM": "Deterministic (eta = 0): keeps the seed's own noise, so the image stays close to the one made without OMS.",
    };
    function titleSolverChoices() {
        const root = typeof gradioApp === "function" ? gradioApp() : document;
        const choices = root.querySelectorAll('[id$="one_more_step_solver"] span, [id$="one_more_step_solver"] input');
        for (const element of choices) {
            const choice = element.tagName === "INPUT" ? element.value : element.textContent.trim();
            if (choice in solverTitles) {
                element.title = solverTitles[choice];
            }
        }
    }
    function addOmsTitles() {
        if (typeof titles !== "undefined") {
            Object.assign(titles, omsTitles);
        }
        titleSolverChoices();
    }
    addOmsTitles();
    if (typeof onUiLoaded === "function") {
        onUiLoaded(addOmsTitles);
    }
    if (typeof onUiUpdate === "function") {
        onUiUpdate(titleSolverChoices);  // before the WebUI's tooltip pass, which runs a second after a change
    }
})();
