"""A small latent-diffusion world in which SD's brightness flaw and the OMS fix both happen.

``python -m lib_oms.demo`` runs the demo on the weights shipped in models/demo; ``python -m lib_oms.demo.reproduce``
retrains them. The world (world.py), its text encoder, base denoiser and Euler sampler are plain torch; the OMS
module, its step and the sampler hand-over are the project's own (lib_oms.unet, lib_oms.module_files, lib_oms.engine).
"""
