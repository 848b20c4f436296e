"""The One More Step nodes in a real ComfyUI (gated: skipped unless COMFYUI_PATH names a ComfyUI folder).

    COMFYUI_PATH=~/ComfyUI [COMFYUI_PYTHON=~/ComfyUI/venv/bin/python] python -m pytest -v tests/comfyui

COMFYUI_PYTHON defaults to COMFYUI_PATH/venv/bin/python, then COMFYUI_PATH/.venv/bin/python; that Python also needs
this project's requirements.txt. Nothing here imports ComfyUI: it runs in subprocesses of that Python, with scratch
folders under pytest's tmp_path (ComfyUI's --base-directory and --database-url point there), and the ComfyUI folder
is checked to be left as it was.

- The probe (probe_sampling.py, tiny random SD 1.5- and SDXL-shaped models, under a minute): every sampler path starts
  at x̂0 + σ₀·z with OMS and the module of the model's family, every start that is not pure noise and every model no
  module fits (the SDXL refiner, Playground 2.5, zero-terminal SNR, EDM, flow) is left as it was, saying why.
- The server (under 2 minutes on 2 CPU cores, plus about 1 minute the first time to make the OMS files): ComfyUI's
  HTTP API lists the nodes and runs checkpoint → One More Step → KSampler → VAE decode → save image, without OMS,
  with it and with it bypassed. It needs a random SD 1.5 checkpoint (COMFYUI_TEST_CHECKPOINT, or the one the WebUI
  runner makes, tests/webui/harness/run.py; skipped without one) and full-size random OMS files: those beside that
  checkpoint when the runner made them, else made once with the runner's assets.py into test-webuis/assets (1.6 GB),
  since the nodes load the real OpenCLIP ViT-H/14 architecture.
- The frontend (needs playwright and a Chromium, tests/browser.py; skipped without them): the documented workflow
  opened as a file in ComfyUI's own frontend and run from its Run button; the One More Step node then shows its
  summary in its text box (the pack's web/one_more_step.js), and why it skipped when it does.
  With OMS_SCREENSHOTS_DIR set (as for the WebUI's pictures, tests/webui/test_webui_screenshots.py) it also saves
  the node showing its summary as <OMS_SCREENSHOTS_KIND, default comfyui>-node-text.png there, and the pack's three
  nodes as <kind>-nodes.png, for a person to see.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("probe_sampling.py")
DOCS_WORKFLOW = REPO / "docs" / "comfyui_workflow_api.json"
RUNNER_ASSETS = REPO / "test-webuis" / "assets"  # the WebUI runner's default work folder (git-ignored)
CHECKPOINT_NAME = "sd15_random.safetensors"
RUNNER_CHECKPOINT = RUNNER_ASSETS / CHECKPOINT_NAME  # the random SD 1.5 checkpoint the WebUI runner makes there
MODULE_NAME = "oms_b_openclip_15_21"  # the random OMS-B of the WebUI runner's assets, named as released
DOCS_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
NODE_IDS = ("OneMoreStepLoader", "OneMoreStep", "OneMoreStepNoise")
PROMPT = "a black cat in a dark room at night"
REL_TOL = 2e-6  # fp32 rounding of x̂0 + σ₀·z, relative to its largest entry
SERVER_START_S, PROMPT_S = 300, 300


def comfyui() -> tuple[Path, Path]:
    """COMFYUI_PATH and its Python, or a skip saying what is missing."""
    folder = os.environ.get("COMFYUI_PATH", "")
    if not folder:
        pytest.skip("COMFYUI_PATH is not set: no ComfyUI to test the nodes in (tests/comfyui/test_comfyui.py says how)")
    folder = Path(folder).expanduser().resolve()
    if not (folder / "main.py").is_file() or not (folder / "comfy").is_dir():
        pytest.skip(f"COMFYUI_PATH={folder} is not a ComfyUI folder (no main.py and comfy/)")
    named = os.environ.get("COMFYUI_PYTHON", "")
    candidates = [Path(named).expanduser()] if named else [folder / "venv/bin/python", folder / ".venv/bin/python"]
    python = next((path for path in candidates if path.is_file()), None)
    if python is None:
        pytest.skip(f"no Python for ComfyUI: set COMFYUI_PYTHON (tried {', '.join(map(str, candidates))})")
    return folder, python


def scratch_env(tmp: Path) -> dict:
    """The environment of ComfyUI's processes: offline, with an empty Hugging Face cache of their own."""
    return {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONDONTWRITEBYTECODE": "1"}


sys.path.insert(0, str(REPO / "tests" / "webui" / "harness"))
import host  # noqa: E402  (the WebUI runner's before/after check of a host's folder)
from server import free_port  # noqa: E402  (the WebUI runner's)


@pytest.fixture(scope="module")
def comfy():
    folder, python = comfyui()
    before = host.snapshot(folder)
    yield folder, python
    changed = host.changes(before, host.snapshot(folder))
    assert not changed, f"the tests changed files in COMFYUI_PATH: {changed[:20]}"


# ---------------------------------------------------------------------------------------------------------------
# The probe: ComfyUI's own samplers, a tiny model


@pytest.fixture(scope="module")
def probe(comfy, tmp_path_factory) -> dict:
    folder, python = comfy
    tmp = tmp_path_factory.mktemp("probe")
    out = tmp / "probe.json"
    done = subprocess.run([str(python), str(PROBE), str(folder), str(tmp / "base"), str(out)], cwd=tmp,
                          env=scratch_env(tmp), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"the probe failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())


def cases(probe: dict, expect: str) -> dict:
    chosen = {name: case for name, case in probe.items() if case["expect"] == expect}
    assert chosen, f"the probe has no {expect!r} case"
    return chosen


def test_probe_every_oms_case_starts_at_x0_hat_plus_sigma0_z(probe):
    wrong = {name: case for name, case in cases(probe, "oms").items() if case["diff"] > REL_TOL * case["scale"]}
    assert not wrong, f"the first x is not x̂0 + σ₀·z (diff relative to scale over {REL_TOL}): {wrong}"


def test_probe_every_oms_case_changes_the_start(probe):
    unchanged = {name: case for name, case in cases(probe, "oms").items()
                 if case["plain_diff"] < 0.1 * case["scale"]}
    assert not unchanged, f"OMS left the start (nearly) as without it: {unchanged}"


def test_probe_oms_covers_starts_below_sigma_max(probe):
    assert min(case["sigma0"] for case in cases(probe, "oms").values()) < 14.0  # ddim_uniform, start at step 1


def test_probe_skipped_cases_are_untouched(probe):
    touched = {name: case for name, case in cases(probe, "skipped").items() if case["diff"] != 0.0}
    assert not touched, f"a start that is not pure noise was changed: {touched}"


def test_probe_every_case_says_what_the_nodes_did(probe):
    """OMS cases name the module "Automatic" picked for the family (the SDXL one for SDXL); the others say why not."""
    silent = {name: case["said"] for name, case in probe.items()
              if not any(("starts from the OMS latent" in line and f"{case['module']} [" in line)
                         if case["expect"] == "oms" else "skipped: " in line for line in case["said"])}
    assert not silent, f"the console does not say what One More Step did: {silent}"
    assert {case["module"] for case in cases(probe, "oms").values()} == {"oms_tiny_15_21", "oms_tiny_xl"}


@pytest.mark.parametrize(("name", "reason"), [("sdxl refiner ksampler", "SDXL refiner"),
                                              ("playground 2.5 ksampler", "latent space is SDXL_Playground_2_5"),
                                              ("ksampler zsnr", "zero-terminal-SNR")])
def test_probe_models_without_a_module_are_skipped_saying_why(probe, name, reason):
    assert probe[name]["expect"] == "skipped" and any(reason in line for line in probe[name]["said"])


def test_probe_inpainting_leaves_the_outside_of_the_mask_untouched(probe):
    inpainting = {name: case for name, case in probe.items() if "outside" in case}
    assert inpainting, "the probe has no inpainting case"
    touched = {name: case for name, case in inpainting.items() if case["outside"] != 0.0}
    assert not touched, f"the outside of the mask was changed: {touched}"


# ---------------------------------------------------------------------------------------------------------------
# The workflow (also docs/comfyui_workflow_api.json)


def workflow(checkpoint: str, *, oms: bool = True, bypassed: bool = False, size: int = 64, steps: int = 2,
             download: bool = False, prefix: str = "one_more_step") -> dict:
    """ComfyUI's API format: checkpoint → (Load One More Step module →) One More Step → KSampler → VAE decode → save.
    ``bypassed``: as the UI sends it with One More Step bypassed (the loader stays, unconnected)."""
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "OneMoreStepLoader",
              "inputs": {"module": "Automatic", "text_encoder": "Automatic", "text_encoder_layer": "penultimate",
                         "precision": "Automatic", "download_missing": download}},
        "3": {"class_type": "OneMoreStep",
              "inputs": {"model": ["1", 0], "oms_module": ["2", 0], "prompt": PROMPT, "negative_prompt": "",
                         "cfg": 1.0, "solver": "SDE"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["3", 0], "seed": 42, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
                         "scheduler": "normal", "positive": ["4", 0], "negative": ["5", 0],
                         "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }
    if not oms or bypassed:
        del graph["3"]
        graph["7"]["inputs"]["model"] = ["1", 0]
    if not oms:
        del graph["2"]
    return graph


def test_the_documented_workflow_is_the_tested_one():
    """docs/comfyui_workflow_api.json: this workflow at 512×512, 20 steps, downloading on first use."""
    documented = json.loads(DOCS_WORKFLOW.read_text())
    assert documented == workflow(DOCS_CHECKPOINT, size=512, steps=20, download=True, prefix="ComfyUI_oms")


# ---------------------------------------------------------------------------------------------------------------
# The server


def the_checkpoint() -> Path:
    named = os.environ.get("COMFYUI_TEST_CHECKPOINT", "")
    candidates = [Path(named).expanduser() if named else RUNNER_CHECKPOINT]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        pytest.skip(f"no random SD 1.5 checkpoint (tried {', '.join(map(str, candidates))}): set "
                    "COMFYUI_TEST_CHECKPOINT, or run the WebUI runner (tests/webui/harness/run.py) once to make it")
    return found.resolve()


def oms_files_complete(oms: Path) -> bool:
    return (oms / MODULE_NAME / "model_index.json").is_file() and (oms / "text_encoder" / "model.safetensors").is_file()


def the_oms_folder(checkpoint: Path) -> Path:
    """Full-size random OMS files: those beside the runner's checkpoint, else made (once) with the runner's assets.py
    in test-webuis/assets."""
    for oms in (checkpoint.parent / "oms", RUNNER_ASSETS / "oms"):
        if oms_files_complete(oms):
            return oms
    import assets  # the WebUI runner's maker of random OMS files (tests/webui/harness, on sys.path above)

    oms, _extra = assets.make_oms_folders(RUNNER_ASSETS)
    assert oms_files_complete(oms)
    return oms


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path, base: Path):
        self.url, self.process, self.log, self.base = url, process, log, base

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def request(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{path} answered {error.code}: {error.read().decode(errors='replace')}") from None

    def run(self, prompt: dict) -> dict:
        """Queues ``prompt`` and returns its history entry once it is done."""
        return self.finished(self.request("/prompt", {"prompt": prompt, "client_id": "one-more-step-tests"})
                             ["prompt_id"])

    def finished(self, prompt_id: str) -> dict:
        """The history entry of a queued prompt once it has run (it must have succeeded)."""
        deadline = time.monotonic() + PROMPT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"ComfyUI exited:\n{self.tail()}"
            entry = self.request(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                assert status["status_str"] == "success", f"the prompt failed: {status['messages']}\n{self.tail()}"
                return entry
            time.sleep(1)
        raise AssertionError(f"the prompt did not finish in {PROMPT_S} s:\n{self.tail()}")

    def pixels(self, entry: dict, node: str = "9"):
        from PIL import Image

        (image,) = entry["outputs"][node]["images"]
        with Image.open(self.base / "output" / image["subfolder"] / image["filename"]) as png:
            return png.convert("RGB").tobytes()


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    folder, python = comfy
    checkpoint = the_checkpoint()
    oms = the_oms_folder(checkpoint)
    tmp = tmp_path_factory.mktemp("server")
    base = tmp / "base"
    for sub in ("custom_nodes", "models/checkpoints", "models/oms", "output", "input", "user"):
        (base / sub).mkdir(parents=True)
    (base / "custom_nodes" / "sd-webui-one-more-step").symlink_to(REPO, target_is_directory=True)
    (base / "models" / "checkpoints" / CHECKPOINT_NAME).symlink_to(checkpoint)
    for name in (MODULE_NAME, "text_encoder"):  # one SD module: "Automatic" has one to pick
        (base / "models" / "oms" / name).symlink_to(oms / name, target_is_directory=True)
    port = free_port()
    log = tmp / "comfyui.log"
    # --cache-none: every prompt runs every node, so the bypassed one is computed, not taken from the cache.
    command = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory",
               str(base), "--database-url", f"sqlite:///{tmp / 'comfyui.db'}", "--cache-none",
               "--disable-auto-launch"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=folder, env=scratch_env(tmp), stdout=out, stderr=subprocess.STDOUT)
    running = Server(f"http://127.0.0.1:{port}", process, log, base)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert process.poll() is None, f"ComfyUI exited while starting:\n{running.tail()}"
            assert time.monotonic() < deadline, f"ComfyUI did not answer in {SERVER_START_S} s:\n{running.tail()}"
            try:
                running.request("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_server_lists_the_nodes(server):
    info = server.request("/object_info")
    missing = [node for node in NODE_IDS if node not in info]
    assert not missing, f"not in /object_info: {missing}\n{server.tail()}"
    assert {info[node]["category"] for node in NODE_IDS} == {"One More Step"}
    assert MODULE_NAME in json.dumps(info["OneMoreStepLoader"]["input"]["required"]["module"])


@pytest.fixture(scope="module")
def runs(server) -> dict:
    """(history entry, pixels) of the plain, the OMS and the OMS-bypassed workflow (same seed), run in that order."""
    done = {}
    for name, graph in (("plain", workflow(CHECKPOINT_NAME, oms=False, prefix="plain")),
                        ("oms", workflow(CHECKPOINT_NAME, prefix="oms")),
                        ("bypassed", workflow(CHECKPOINT_NAME, bypassed=True, prefix="bypassed"))):
        entry = server.run(graph)
        done[name] = entry, server.pixels(entry)
    return done


def test_server_oms_workflow_changes_the_image_and_says_what_it_did(runs, server):
    (entry, oms), (_, plain) = runs["oms"], runs["plain"]
    assert oms != plain
    (text,) = entry["outputs"]["3"]["text"]  # what the node shows in its text box (web/one_more_step.js)
    assert text.startswith(f"One More Step: module {MODULE_NAME} [") and PROMPT in text
    assert server.log.read_text().count("[One More Step] the sampling starts from the OMS latent") == 1, server.tail()


def test_server_oms_bypassed_is_bit_identical_to_the_plain_workflow(runs):
    (entry, bypassed), (_, plain) = runs["bypassed"], runs["plain"]
    assert "3" not in entry["outputs"]
    assert bypassed == plain




# ---------------------------------------------------------------------------------------------------------------
# ComfyUI's own frontend in a browser (skipped without playwright and a Chromium: tests/browser.py)

FRONTEND_MS = 180_000
WIDGETS_SMALL = {"1": {"ckpt_name": CHECKPOINT_NAME}, "6": {"width": 64, "height": 64}, "7": {"steps": 2}}
OWN_SCRIPT = "one_more_step.js"  # web/: ComfyUI serves it as /extensions/<the pack's folder>/one_more_step.js
NODE_TEXT = "textarea.one-more-step-text"  # the text box it adds to the One More Step nodes


def close_dialogs(page) -> None:
    """Closes what the frontend shows over the canvas once it is up (it opens them a little after the graph)."""
    import browser

    close = page.get_by_role("button", name="Close dialog", exact=True)
    try:
        close.first.wait_for(state="visible", timeout=15_000)
    except browser.sync_api.TimeoutError:
        return
    while close.count():
        close.first.click()
        page.wait_for_timeout(500)


def run_in_the_page(page, server) -> dict:
    """Presses Run and returns the prompt's history entry once it has run (it must have succeeded)."""
    with page.expect_response(lambda answer: answer.url.endswith("/prompt")
                              and answer.request.method == "POST") as queued:
        page.get_by_test_id("queue-button").click()  # Run
    return server.finished(queued.value.json()["prompt_id"])


def node_text(page, node_id: int):
    """The One More Step node's text box, once the node is centred on the canvas: the one box of the graph, and
    that node's own widget."""
    page.evaluate("id => window.app.canvas.centerOnNode(window.app.graph.getNodeById(id))", node_id)
    box = page.locator(NODE_TEXT)
    assert box.count() == 1 and page.evaluate(
        """([id, selector]) => window.app.graph.getNodeById(id).widgets.some(
               widget => widget.element === document.querySelector(selector))""", [node_id, NODE_TEXT])
    return box


def save_nodes_picture(page, node_ids: list[int], path: Path) -> None:
    """A PNG of the nodes as they are drawn (for a person to look at), with a margin of canvas around them."""
    clip = page.evaluate("""ids => {
        const canvas = window.app.canvas, page = canvas.canvas.getBoundingClientRect(), margin = 20;
        const rects = ids.map(id => window.app.graph.getNodeById(id).boundingRect);
        const left = Math.min(...rects.map(([x]) => x)), top = Math.min(...rects.map(([, y]) => y));
        const right = Math.max(...rects.map(([x, , width]) => x + width));
        const bottom = Math.max(...rects.map(([, y, , height]) => y + height));
        const [x, y] = canvas.convertOffsetToCanvas([left, top]);
        return {x: Math.max(0, page.left + x - margin), y: Math.max(0, page.top + y - margin),
                width: (right - left) * canvas.ds.scale + 2 * margin,
                height: (bottom - top) * canvas.ds.scale + 2 * margin}; }""", node_ids)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=path, clip=clip)


def save_graph_picture(page, path: Path) -> None:
    """A PNG of the pack's three nodes in the opened workflow (for a person to look at): One More Step noise is added
    beside One More Step for the picture, its MODEL connected as in use, and taken away again."""
    noise_id = page.evaluate("""() => {
        const graph = window.app.graph, step = graph.getNodeById(3);
        const noise = window.LiteGraph.createNode("OneMoreStepNoise");
        graph.add(noise);
        noise.pos = [step.pos[0], step.pos[1] + step.size[1] + 60];
        step.connect(0, noise, noise.findInputSlot("model"));
        graph.getNodeById(2).connect(0, noise, noise.findInputSlot("oms_module"));
        window.app.canvas.setDirty(true, true);
        return noise.id; }""")
    page.wait_for_timeout(500)  # the canvas draws the new node at its next frame
    save_nodes_picture(page, [2, 3, noise_id], path)
    page.evaluate("id => window.app.graph.remove(window.app.graph.getNodeById(id))", noise_id)


@pytest.fixture(scope="module")
def frontend(server):
    """ComfyUI's frontend in a browser with docs/comfyui_workflow_api.json opened as a user opens a file; page.errors
    collects the errors of the pack's own script."""
    import browser

    with browser.opened(server.url, "#graph-canvas", FRONTEND_MS, own_script=OWN_SCRIPT) as page:
        page.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady", timeout=FRONTEND_MS)
        page.set_input_files("#comfy-file-input", str(DOCS_WORKFLOW))  # Workflow → Open
        page.wait_for_function("n => window.app.graph.nodes.length === n",
                               arg=len(json.loads(DOCS_WORKFLOW.read_text())), timeout=60_000)
        close_dialogs(page)  # the templates a new user is shown
        yield page


def test_browser_the_documented_workflow_opens_and_runs_with_the_nodes_text_in_the_node(frontend, server):
    """docs/comfyui_workflow_api.json opened in ComfyUI's own frontend: the frontend knows every node (the graph it
    builds gives back the same prompt, so the text box is not sent as an input), and, made small (our random
    checkpoint, 64 px, 2 steps), Run makes the image and the One More Step node shows its summary in its text box.
    With OMS_SCREENSHOTS_DIR set, the node is saved there as a PNG."""
    import browser

    page = frontend
    built = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert {key: {"class_type": node["class_type"], "inputs": node["inputs"]} for key, node in built.items()} \
        == json.loads(DOCS_WORKFLOW.read_text())
    browser.expect(node_text(page, 3)).to_have_value("")  # before the first run: its placeholder only
    page.evaluate("""small => { for (const node of window.app.graph.nodes)
            for (const [name, value] of Object.entries(small[node.id] || {}))
                node.widgets.find(widget => widget.name === name).value = value; }""", WIDGETS_SMALL)
    entry = run_in_the_page(page, server)
    assert len(entry["outputs"]["9"]["images"]) == 1
    box = node_text(page, 3)
    browser.expect(box).to_be_visible()
    browser.expect(box).to_have_value(re.compile(rf"^One More Step: module {MODULE_NAME} \[.*'{PROMPT}'"))
    assert box.evaluate("box => box.readOnly")
    if os.environ.get("OMS_SCREENSHOTS_DIR"):
        pictures = Path(os.environ["OMS_SCREENSHOTS_DIR"])
        kind = os.environ.get("OMS_SCREENSHOTS_KIND", "comfyui")
        save_nodes_picture(page, [3], pictures / f"{kind}-node-text.png")
        save_graph_picture(page, pictures / f"{kind}-nodes.png")
    assert not page.errors, f"the pack's script failed in the page: {page.errors}"


def test_browser_a_skipping_node_says_why_in_the_node_instead(frontend, server):
    """An x0-prediction model (ModelSamplingDiscrete put before One More Step in the page): the node passes it
    through, and its text box holds only why (after the summary of the test above, replaced, not added to)."""
    import browser

    page = frontend
    page.evaluate("""() => {
        const graph = window.app.graph, sampling = window.LiteGraph.createNode("ModelSamplingDiscrete");
        graph.add(sampling);
        sampling.widgets.find(widget => widget.name === "sampling").value = "x0";
        graph.getNodeById(1).connect(0, sampling, 0);
        sampling.connect(0, graph.getNodeById(3), 0); }""")
    run_in_the_page(page, server)
    box = node_text(page, 3)
    browser.expect(box).to_be_visible()
    browser.expect(box).to_have_value(
        re.compile(r"^One More Step skipped: the model samples with ModelSamplingDiscrete \+ X0\b[^\n]*$"))
    assert not page.errors, f"the pack's script failed in the page: {page.errors}"
