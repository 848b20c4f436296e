"""The real WebUIs CI tests, the Python environments they run in, and what each needs to start offline.

Data only: build.py, assets.py and run.py read it. Archives are in ``../shared/webui/`` (its README lists each one and
what it took to run it on a CPU). Environments are layered so that big packages are installed once: an environment
sees its base's packages (a ``.pth`` file) and installs only what differs, so torch 2.14.1 lives once (in the unit-test
environment, ``.venv``) for A1111 1.9.4 / 1.10.1, Forge and reForge, and torch 2.0.1 once for A1111 1.6.0 and the
unit suite on that oldest stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Every WebUI pins setuptools 69.5.1; torch >= 2.13 needs >= 77 and the WebUIs still import pkg_resources (gone in 81).
SETUPTOOLS = "setuptools>=77.0.3,<81"
# k-diffusion and reForge import OpenAI's `clip` package (the PyPI name `clip` is an unrelated tool).
OPENAI_CLIP = "openai-clip==1.0.1"


@dataclass(frozen=True)
class PythonEnv:
    name: str
    base: str | None  # the environment whose packages this one sees; None: a standalone environment
    requirements_of: str | None = None  # the WebUI whose requirements_versions.txt is installed
    requirements_file: str | None = None  # or a requirements file of this repository
    replace: dict[str, str] = field(default_factory=dict)  # requirement name (lower case) -> replacement line
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class WebUI:
    name: str
    archive: str
    top: str  # the archive's top folder
    env: str
    repositories: dict[str, str]  # folder under repositories/ -> archive
    flags: tuple[str, ...]
    pytest_args: tuple[str, ...]  # which of tests/webui run against it
    options: dict = field(default_factory=dict)  # written to the WebUI's config.json before the first start


UNIT_ENV = "unit"  # the repository's own .venv (the README's test command makes it): torch 2.14.1
A1111_REPOS = {
    "stable-diffusion-stability-ai": "stablediffusion-cf1d67a6.tar.gz",
    "generative-models": "generative-models-45c443b3.tar.gz",
    "k-diffusion": "k-diffusion-ab527a9a.tar.gz",
    "BLIP": "BLIP-48211a15.tar.gz",
}
ASSETS_REPO = {"stable-diffusion-webui-assets": "stable-diffusion-webui-assets-6f7db241.tar.gz"}
A1111_FLAGS = ("--use-cpu", "all", "--no-half", "--precision", "full")
FORGE_FLAGS = ("--always-cpu",)
SMOKE = ("-m", "smoke")

ENVS = {
    env.name: env
    for env in (
        PythonEnv("a1111", UNIT_ENV, requirements_of="a1111-1.10.1", replace={"setuptools": SETUPTOOLS},
                  extra=(OPENAI_CLIP,)),
        PythonEnv("a1111-1.9", "a1111", requirements_of="a1111-1.9.4", replace={"setuptools": SETUPTOOLS}),
        PythonEnv("forge", UNIT_ENV, requirements_of="forge", replace={"setuptools": SETUPTOOLS},
                  extra=("joblib",)),  # Forge's built-in soft inpainting imports joblib; its requirements lack it
        PythonEnv("reforge", "a1111", requirements_of="reforge",
                  replace={"setuptools": SETUPTOOLS, "pydantic": "pydantic==1.10.15"}),  # its pin is a URL
        # A1111 1.6.0 installs torch 2.0.1 itself, and its users run that. httpx >= 0.25 stops its gradio importing.
        PythonEnv("a1111-1.6", None, requirements_of="a1111-1.6.0",
                  extra=("torch==2.0.1", "torchvision==0.15.2", "httpx==0.24.1", OPENAI_CLIP)),
        # The unit suite on the oldest stack a supported WebUI ships (1.6.0's torch, numpy, safetensors, transformers).
        PythonEnv("oldest-unit", "a1111-1.6", requirements_file="requirements-test-oldest.txt"),
    )
}

WEBUIS = {
    webui.name: webui
    for webui in (
        WebUI("a1111-1.10.1", "a1111-v1.10.1.tar.gz", "stable-diffusion-webui", "a1111", {**A1111_REPOS, **ASSETS_REPO},
              A1111_FLAGS, ()),
        WebUI("a1111-1.9.4", "a1111-v1.9.4.tar.gz", "stable-diffusion-webui", "a1111-1.9",
              {**A1111_REPOS, **ASSETS_REPO}, A1111_FLAGS, SMOKE),
        WebUI("a1111-1.6.0", "a1111-v1.6.0.tar.gz", "stable-diffusion-webui", "a1111-1.6",
              {**A1111_REPOS, "CodeFormer": "CodeFormer-c5b45930.tar.gz"}, A1111_FLAGS, SMOKE),
        WebUI("forge", "forge-dfdcbab6.tar.gz", "stable-diffusion-webui-forge", "forge",
              {"BLIP": "BLIP-48211a15.tar.gz", "huggingface_guess": "huggingface_guess-84826248.tar.gz",
               **ASSETS_REPO}, FORGE_FLAGS, ("-m", "smoke or xyz")),
        WebUI("reforge", "reforge-3b56b268.tar.gz", "stable-diffusion-webui-reForge", "reforge",
              {**A1111_REPOS, **ASSETS_REPO}, FORGE_FLAGS, ("-m", "smoke or xyz"),
              options={"live_previews_enable": False}),  # its live preview would try to download a model
    )
}
