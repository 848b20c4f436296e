"""One More Step (Hu et al., CVPR 2024) for diffusers pipelines, on the host-neutral core ``lib_oms``.

    from oms_diffusers import OneMoreStep

    oms = OneMoreStep()
    start = oms.start(pipe, prompt, generator=generator, num_inference_steps=30)
    image = pipe(prompt, generator=generator, num_inference_steps=30, latents=start.latents).images[0]

Needs diffusers (``pip install "sd-webui-one-more-step[diffusers]"``); the WebUI extension and the ComfyUI nodes
never import this package.
"""

from oms_diffusers.one_more_step import OneMoreStep, Start

__all__ = ["OneMoreStep", "Start"]
