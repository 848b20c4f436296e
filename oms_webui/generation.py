"""One generation as every WebUI host sees it: what OMS reads as the prompt (with the WebUI's own prompt parser), the
plan decided in ``process`` and carried out per batch, and what is said in the console and written to the infotext.
Imports the WebUI's ``modules`` (the A1111 family's and SD.Next's alike) when a function runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from lib_oms.runtime import Prepared
from oms_webui.args import (
    INFOTEXT_FIRST_PASS_ONLY,
    INFOTEXT_MODULE_REQUESTED,
    INFOTEXT_SKIPPED,
    OMSArgs,
    infotext_keys,
    infotext_params,
    module_hash,
)
from oms_webui.environment import log


def clean_prompt(prompt: str, steps: int) -> str:
    """The prompt as the sampler reads it at its first step, in plain words for the OMS text encoder, read with the
    WebUI's own parsers: extra-network tags (<lora:…>) removed, AND-separated sub-prompts joined with commas (their
    weights dropped), prompt editing and alternation at the first step, emphasis syntax and BREAK removed."""
    from modules import extra_networks, prompt_parser

    text, _networks = extra_networks.parse_prompt(prompt)
    _indexes, subprompts, _positions = prompt_parser.get_multicond_prompt_list([text])
    cleaned = []
    for subprompt in subprompts:
        first_step = prompt_parser.get_learned_conditioning_prompt_schedules([subprompt], max(int(steps), 1))[0][0][1]
        chunks = prompt_parser.parse_prompt_attention(first_step)  # BREAK comes as ["BREAK", -1]
        # Chunks are joined by a space: the WebUIs tokenize each chunk apart (a chunk boundary is a word boundary), and
        # SD.Next's parser strips the spaces around chunks ("a (b:1.2) c" gives "a", "b", "c").
        text = " ".join(" " if (chunk, weight) == ("BREAK", -1) else chunk for chunk, weight in chunks)
        words = " ".join(text.split())
        if words:
            cleaned.append(words)
    return ", ".join(cleaned)


def oms_prompts(oms_prompt: str, image_prompts: list[str], steps: int) -> list[str]:
    """One OMS prompt per image: the OMS prompt when given, else each image's own prompt, all cleaned."""
    if oms_prompt.strip():
        return [clean_prompt(oms_prompt, steps)] * len(image_prompts)
    return [clean_prompt(prompt, steps) for prompt in image_prompts]


@dataclass
class Plan:
    """One generation's OMS: decided in ``process`` (before anything is sampled), carried out per batch."""

    args: OMSArgs
    job: object = None  # what the host's glue read of the generation
    prepared: Prepared | None = None
    placement: object = None  # where the host runs the step (the A1111 family's memory placement)
    error: Exception | None = None  # raised where the host stops the generation
    said: set = field(default_factory=set)
    started: object = None  # what the host handed its sampler last (SD.Next: its p.init_latent)


def say_once(plan: Plan, message: str) -> None:
    """Said in the console once per generation (not once per batch)."""
    if message not in plan.said:
        plan.said.add(message)
        log(message)


def say_skipped(p, plan: Plan, reason: str) -> None:
    """A skip replaces the OMS keys of the infotext with its reason and is said once per generation in the console."""
    for key in infotext_keys():
        p.extra_generation_params.pop(key, None)
    p.extra_generation_params[INFOTEXT_SKIPPED] = reason
    say_once(plan, f"skipped: {reason}")


def record_applied(p, plan: Plan, untouched_passes: list[str]) -> None:
    """What was loaded said in the console; the infotext of an applied step, with a pasted module hash that is not
    the local file's and the passes that continue from the first as they are."""
    args, module = plan.args, plan.prepared.module
    for loaded in plan.prepared.loaded:
        log(f"{loaded} loaded")
    p.extra_generation_params.update(infotext_params(args, plan.prepared.label))
    requested_hash = module_hash(args.module)
    if requested_hash and requested_hash != module.short_hash.lower():
        p.extra_generation_params[INFOTEXT_MODULE_REQUESTED] = args.module
        say_once(plan, f"the module file {module.weights_path} has hash {module.short_hash}, not {requested_hash} as "
                       f"asked ({args.module}): it is another file of that name, so the image will differ from the one "
                       "these parameters came from")
    passes = "; ".join(untouched_passes)
    if passes:
        p.extra_generation_params[INFOTEXT_FIRST_PASS_ONLY] = passes
        log(f"the first pass starts from the OMS latent; the {passes} continue from it as usual")


def without_frames(error: Exception) -> Exception:
    """``error`` as the user will see it (its type and message) without its traceback and chained errors: kept until
    the step, those would hold the failed load's frames and their tensors in a reference cycle with ``p`` that only a
    full garbage collection frees (1.9 GB per failed request with a real text encoder)."""
    error.__cause__ = error.__context__ = None
    return error.with_traceback(None)
