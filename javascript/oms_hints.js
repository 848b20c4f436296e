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
    function addOmsTitles() {
        if (typeof titles !== "undefined") {
            Object.assign(titles, omsTitles);
        }
    }
    addOmsTitles();
    if (typeof onUiLoaded === "function") {
        onUiLoaded(addOmsTitles);
    }
})();
