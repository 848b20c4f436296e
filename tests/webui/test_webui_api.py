"""txt2img through the WebUI API with One More Step on and off: arguments, infotext, errors, batches."""

from __future__ import annotations

import os

import pytest
import webui_api as api


def test_script_is_listed(server):
    """/sdapi/v1/scripts names the script in both tabs (every WebUI version; script-info fails on A1111 1.6)."""
    reply = api.get("/sdapi/v1/scripts")
    assert reply.status == 200, reply.text[:500]
    for tab in ("txt2img", "img2img"):
        assert api.SCRIPT_TITLE.lower() in [name.lower() for name in reply.body[tab]], reply.body


def test_script_is_listed_with_its_arguments_in_api_order(script_info):
    entries = [s for s in script_info if s["name"] == api.SCRIPT_TITLE.lower()]
    assert {s["is_img2img"] for s in entries} == {False, True}, "expected in both txt2img and img2img"
    for entry in entries:
        assert entry["is_alwayson"] is True
        assert tuple(arg["label"] for arg in entry["args"]) == api.ARG_LABELS
        assert tuple(arg.get("value") for arg in entry["args"]) == api.ARG_DEFAULTS
    module_arg = entries[0]["args"][api.ARG_NAMES.index("module")]
    assert api.DEFAULT_MODULE in module_arg["choices"], module_arg
    solver_arg = entries[0]["args"][api.ARG_NAMES.index("solver")]
    # SD.Next's gradio 3.43 lists a radio's choices as (value, label) pairs
    assert [c[0] if isinstance(c, list) else c for c in solver_arg["choices"]] == ["SDE", "DDIM"]


@pytest.mark.parametrize("oms_args", [
    pytest.param(api.positional_args(), id="positional-defaults"),
    pytest.param({"enabled": False, "cfg": 3.0, "prompt": "ignored while off"}, id="dict-disabled"),
])
def test_disabled_is_bit_identical_to_a_request_without_the_script(generate, baseline, oms_args):
    off = generate(api.payload(oms_args))
    assert api.same_pixels(off.images[0], baseline.images[0])
    assert off.infotexts == baseline.infotexts
    assert not api.oms_keys(off.extra) and not api.oms_keys(off.params())


def test_enabled_changes_the_image_and_writes_its_infotext(baseline, oms_on):
    assert not api.same_pixels(oms_on.images[0], baseline.images[0])
    assert api.mean_abs_diff(oms_on.images[0], baseline.images[0]) > 1.0
    params = oms_on.params()
    assert params["OMS"] == "True"
    assert params["OMS module"].startswith(api.DEFAULT_MODULE + " [")  # "name [10-hex-digit file hash]"
    assert len(params["OMS module"].split("[")[1].rstrip("]")) == 10
    assert float(params["OMS CFG"]) == 1.0
    assert params["OMS solver"] == "SDE"
    # Prompts are written only when given; nothing was skipped in a plain txt2img run.
    assert not {"OMS prompt", "OMS negative prompt", "OMS skipped"} & set(params)
    # Everything else in the infotext is the baseline's.
    assert {k: v for k, v in params.items() if not k.startswith("OMS")} == baseline.params()


def test_enabled_is_deterministic(generate, oms_on):
    again = generate(api.payload(api.positional_args(enabled=True)), fresh=True)
    assert api.same_pixels(again.images[0], oms_on.images[0])
    assert again.infotexts == oms_on.infotexts


def test_dict_and_positional_arguments_give_the_same_image(generate, oms_on):
    positional = generate(api.payload(api.positional_args(enabled=True, cfg=3.0)))
    as_dict = generate(api.payload({"enabled": True, "cfg": 3.0}))
    assert api.same_pixels(positional.images[0], as_dict.images[0])
    assert positional.infotexts == as_dict.infotexts
    assert float(positional.params()["OMS CFG"]) == 3.0
    assert not api.same_pixels(positional.images[0], oms_on.images[0]), "OMS CFG 3 should differ from 1"


def test_prompt_solver_and_module_arguments_reach_the_step(generate, oms_on):
    made = {
        "prompt": generate(api.payload({"enabled": True, "prompt": "a bright white snowfield"})),
        "negative_prompt": generate(api.payload({"enabled": True, "cfg": 3.0, "negative_prompt": "dark"})),
        "solver": generate(api.payload({"enabled": True, "solver": "DDIM"})),
        "module": generate(api.payload({"enabled": True, "module": "oms_s_sd15_test"})),
    }
    # The negative prompt only matters with OMS CFG != 1: compare it with OMS CFG 3 and no negative prompt.
    cfg3 = generate(api.payload(api.positional_args(enabled=True, cfg=3.0)))
    for name, gen in made.items():
        reference = cfg3 if name == "negative_prompt" else oms_on
        assert not api.same_pixels(gen.images[0], reference.images[0]), f"changing {name} did not change the image"
    assert made["prompt"].params()["OMS prompt"] == "a bright white snowfield"
    assert made["negative_prompt"].params()["OMS negative prompt"] == "dark"
    assert made["solver"].params()["OMS solver"] == "DDIM"
    assert made["module"].params()["OMS module"].startswith("oms_s_sd15_test [")


def test_the_oms_prompt_is_read_at_the_first_step_as_the_webui_parses_it(generate):
    """The WebUI's own prompt parser reads the OMS prompt: prompt editing at its first step, emphasis and BREAK
    removed. Each of these reads "a bright white snowfield" and so makes the very image of that plain prompt."""
    plain = generate(api.payload({"enabled": True, "prompt": "a bright white snowfield"}))
    for written in ("a [bright:dark:0.9] white snowfield", "a (bright:1.3) white ((snowfield))",
                    "a bright BREAK white snowfield"):
        read = generate(api.payload({"enabled": True, "prompt": written}))
        assert api.same_pixels(read.images[0], plain.images[0]), f"{written!r} was not read as the plain prompt"
    other = generate(api.payload({"enabled": True, "prompt": "a [dark:bright:0.9] white snowfield"}))
    assert not api.same_pixels(other.images[0], plain.images[0]), "prompt editing was not read at the first step"


def test_infotext_pastes_back_through_the_api(generate, oms_on):
    """The API's ``infotext`` field fills the script's arguments from the infotext (infotext_fields). Keys other
    extensions add to a pasted image are theirs (Dynamic Thresholding, pasted so, writes its 11 unticked controls'
    gradio updates as values): every key of the original is checked, and no OMS key is added."""
    pasted = generate({key: value for key, value in api.BASE_PAYLOAD.items() if key in ("save_images", "send_images")}
                      | {"infotext": oms_on.infotexts[0]})
    original = oms_on.params()
    assert {key: pasted.params().get(key) for key in original} == original
    assert api.oms_keys(pasted.params()) == api.oms_keys(original)
    assert api.same_pixels(pasted.images[0], oms_on.images[0])


@pytest.mark.parametrize("oms_args, named", [
    pytest.param({"enabled": True, "cfg": "lots"}, "cfg", id="cfg-not-a-number"),
    pytest.param(api.positional_args(enabled=True, cfg=99.0), "cfg", id="cfg-out-of-range"),
    pytest.param({"enabled": True, "solver": "Heun"}, "solver", id="unknown-solver"),
    pytest.param({"enabled": True, "strength": 2}, "strength", id="unknown-key"),
    pytest.param({"enabled": True, "module": "no_such_module"}, "no_such_module", id="missing-module"),
    pytest.param({"enabled": True, "module": "oms_s_openclip_xl_test"}, "sdxl", id="module-of-another-latent-space"),
    pytest.param({"enabled": "maybe"}, "enabled", id="enabled-not-a-bool"),
])
def test_bad_argument_is_an_error_response_naming_the_field(server, oms_args, named):
    reply = api.request("POST", "/sdapi/v1/txt2img", api.payload(oms_args))
    assert reply.status >= 400, f"expected an error, got HTTP {reply.status}"
    assert named.lower() in reply.text.lower(), reply.text[:1000]
    assert "One More Step".lower() in reply.text.lower() or "OMS" in reply.text, reply.text[:1000]


def test_server_still_generates_after_an_error(generate, oms_on):
    api.request("POST", "/sdapi/v1/txt2img", api.payload({"enabled": True, "cfg": "lots"}))
    again = generate(api.payload(api.positional_args(enabled=True)), fresh=True)
    assert api.same_pixels(again.images[0], oms_on.images[0])


def test_failed_loads_release_what_they_read(generate, oms_on):
    """Three OMS requests that fail after reading a whole module leave the server's memory where it was, and the
    server still makes the normal OMS image.

    The harness must place ``models/oms/broken_for_tests.safetensors``: the OMS-B test module's weights (the
    ``oms_module/diffusion_pytorch_model.safetensors`` of ``oms_b_openclip_15_21``, 616 MB in fp32) saved as one
    lone .safetensors with NaN written into one tensor, no sidecar (the config is inferred from the shapes). Its
    header passes every check, so each request reads all 616 MB before the NaN is found: the point where the
    extension used to keep the failed loader's frames, and so those tensors, alive in a reference cycle until a full
    garbage collection (1.9 GB per failed request on A1111 1.6). Bound: 300 MB over three requests, under half of
    what one request kept; the first failing request is not counted (the allocator's pools may grow once for good).
    """
    body = api.payload({"enabled": True, "module": api.BROKEN_MODULE})

    def fail():
        reply = api.request("POST", "/sdapi/v1/txt2img", body)
        assert reply.status >= 400 and "NaN" in reply.text, (
            f"expected the NaN error of models/oms/{api.BROKEN_MODULE}.safetensors (placed by the harness), got "
            f"HTTP {reply.status}: {reply.text[:1000]}")

    fail()
    before = api.server_rss()
    for _ in range(3):
        fail()
    grown = api.server_rss() - before
    assert grown < 300 * 2**20, f"the server grew by {grown / 2**20:.0f} MB over three failed requests"
    again = generate(api.payload(api.positional_args(enabled=True)), fresh=True)
    assert api.same_pixels(again.images[0], oms_on.images[0])


def test_variation_strength_changes_an_oms_image_as_much_as_a_plain_one(generate, baseline, oms_on):
    """Variation strength 0.5 changes the image with OMS on (SDE solver) about as much as without OMS: z, the SDE
    solver's fresh noise, follows the variation seed as the WebUI's noise does. The bound, half the plain change,
    holds when z moves like the WebUI's noise (the two changes are then alike, the images differing only by what
    the random weights make of them), and fails when only the OMS input follows the variation seed: the start is
    x̂0 + σ₀·z with σ₀ ≈ 14.6, so a z that stays put keeps the start, and the image, nearly unchanged."""
    plain = generate(api.payload(subseed_strength=0.5))
    with_oms = generate(api.payload({"enabled": True}, subseed_strength=0.5))
    assert next(with_oms.params()[key] for key in api.VARIATION_STRENGTH_KEYS if key in with_oms.params()) == "0.5"
    plain_change = api.mean_abs_diff(plain.images[0], baseline.images[0])
    oms_change = api.mean_abs_diff(with_oms.images[0], oms_on.images[0])
    assert plain_change > 1.0, f"variation strength 0.5 changed the plain image by only {plain_change:.2f}"
    assert oms_change > 0.5 * plain_change, (oms_change, plain_change)


def test_variation_batch_with_oms_gives_distinct_images(generate):
    """Under a variation strength A1111 gives every image of a batch the same seed and counts up only the variation
    seed: with z drawn from the seed alone the two OMS images were near-duplicates. Each image is also the one made
    alone with its variation seed (same rounding bound as test_batch_of_two_equals_two_single_images)."""
    seed, subseed = api.BASE_PAYLOAD["seed"], api.BASE_PAYLOAD["subseed"]
    plain = generate(api.payload(batch_size=2, subseed_strength=0.5))
    with_oms = generate(api.payload({"enabled": True}, batch_size=2, subseed_strength=0.5))
    assert [with_oms.params(i)["Seed"] for i in range(2)] == [str(seed)] * 2
    assert [with_oms.params(i)["Variation seed"] for i in range(2)] == [str(subseed), str(subseed + 1)]
    plain_apart = api.mean_abs_diff(plain.images[0], plain.images[1])
    oms_apart = api.mean_abs_diff(with_oms.images[0], with_oms.images[1])
    assert plain_apart > 1.0 and oms_apart > 0.5 * plain_apart, (oms_apart, plain_apart)
    second_alone = generate(api.payload({"enabled": True}, subseed=subseed + 1, subseed_strength=0.5))
    got, want = with_oms.images[1], second_alone.images[0]
    assert api.max_abs_diff(got, want) <= 2 and api.mean_abs_diff(got, want) < 0.05, api.mean_abs_diff(got, want)


def test_batch_of_two_equals_two_single_images(generate, oms_on, baseline):
    seed = api.BASE_PAYLOAD["seed"]
    batch = generate(api.payload({"enabled": True}, batch_size=2))
    second = generate(api.payload({"enabled": True}, seed=seed + 1))
    assert len(batch.images) == 2
    assert [int(batch.params(i)["Seed"]) for i in range(2)] == [seed, seed + 1]
    # Batched UNet calls round differently from single ones (A1111: pixels off by at most 1, mean 3e-4; SD.Next's
    # diffusers pipelines by up to 13 grey levels, mean 0.5, without One More Step too): the bound is twice what the
    # WebUI itself does without OMS, at least 2 levels and 0.05. Anything OMS gets wrong per image (another image's
    # prompt, seed or z) changes most pixels by far more.
    plain_batch = generate(api.payload(batch_size=2))
    plain_second = generate(api.payload(seed=seed + 1))
    plain_pairs = ((plain_batch.images[0], baseline.images[0]), (plain_batch.images[1], plain_second.images[0]))
    max_bound = max(2, 2 * max(api.max_abs_diff(got, want) for got, want in plain_pairs))
    mean_bound = max(0.05, 2 * max(api.mean_abs_diff(got, want) for got, want in plain_pairs))
    for got, want in ((batch.images[0], oms_on.images[0]), (batch.images[1], second.images[0])):
        assert api.max_abs_diff(got, want) <= max_bound and api.mean_abs_diff(got, want) < mean_bound, (
            api.max_abs_diff(got, want), api.mean_abs_diff(got, want), max_bound, mean_bound)
    assert api.mean_abs_diff(batch.images[0], baseline.images[0]) > 1.0
    assert all(batch.params(i)["OMS"] == "True" for i in range(2))


def test_negative_prompt_is_unused_at_oms_cfg_1(generate, oms_on):
    """At OMS CFG 1 the unconditional pass is not computed: the image is the one without it."""
    with_negative = generate(api.payload({"enabled": True, "negative_prompt": "dark"}))
    assert api.same_pixels(with_negative.images[0], oms_on.images[0])
    assert with_negative.params()["OMS negative prompt"] == "dark"


def test_modules_from_the_oms_models_dir_flag_are_offered(script_info):
    """preload.py's --oms-models-dir: the server is started with a folder holding SD_WEBUI_OMS_EXTRA_MODULE."""
    extra = os.environ.get("SD_WEBUI_OMS_EXTRA_MODULE")
    if not extra:
        pytest.skip("SD_WEBUI_OMS_EXTRA_MODULE is not set (server not started with --oms-models-dir)")
    entry = next(s for s in script_info if s["name"] == api.SCRIPT_TITLE.lower() and not s["is_img2img"])
    assert extra in entry["args"][api.ARG_NAMES.index("module")]["choices"]
