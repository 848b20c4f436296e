"""The real-WebUI runner's own logic (tests/webui/harness/): which kind of WebUI a folder is, the flags it is started
with, the scratch data folder, and the check that a run left the WebUI's folder as it was. On small stand-in folders
that hold only what the runner reads (flag definitions written as each WebUI writes them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

HARNESS = Path(__file__).resolve().parent / "webui" / "harness"
sys.path.insert(0, str(HARNESS))

import assets  # noqa: E402
import host  # noqa: E402
import run  # noqa: E402


def webui(tmp_path: Path, files: dict[str, str]) -> Path:
    folder = tmp_path / "webui"
    for name, text in {"launch.py": "", "modules/scripts.py": "", **files}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def flags(*names: str) -> str:
    return "\n".join(f'parser.add_argument("{name}", action="store_true")' for name in names)


A1111_ARGS = flags("--data-dir", "--ckpt", "--use-cpu", "--no-half", "--skip-prepare-environment",
                   "--skip-torch-cuda-test", "--no-download-sd-model")


def test_a1111_is_recognised_with_its_release_and_cpu_flags(tmp_path):
    folder = webui(tmp_path, {"modules/cmd_args.py": A1111_ARGS, "CHANGELOG.md": "## 1.10.1\n\n## 1.10.0\n",
                              "configs/v1-inference.yaml": "", "repositories/stable-diffusion-stability-ai/ldm/x": ""})
    kind = host.detect(folder)
    assert kind.name == "A1111 1.10.1" and not kind.forge_family and kind.can_make_checkpoint
    assert kind.cpu_flags() == ("--use-cpu", "all", "--no-half", "--precision", "full")
    assert kind.start_flags()[:4] == ("--skip-prepare-environment", "--skip-torch-cuda-test", "--no-download-sd-model",
                                      "--api")
    assert kind.test_set() == ()  # everything in tests/webui


def test_forge_classic_is_recognised_by_its_xyz_folder_and_always_cpu(tmp_path):
    folder = webui(tmp_path, {"modules/cmd_args.py": A1111_ARGS, "modules_forge/__init__.py": "",
                              "ldm_patched/modules/args_parser.py": flags("--always-cpu"),
                              "extensions-builtin/xyz/scripts/xyz_grid.py": "",
                              "README.md": "# Stable Diffusion WebUI Forge\n"})
    kind = host.detect(folder)
    assert kind.name == "Forge Classic" and kind.forge_family and not kind.can_make_checkpoint
    assert kind.cpu_flags() == ("--always-cpu",)
    assert kind.test_set() == ("-m", "smoke or xyz or browser or fakes")


def test_forge_neo_gets_only_the_flags_it_has(tmp_path):
    """Neo defines --cpu in backend/args.py and --data-dir in paths_internal.py, and has no --ckpt or
    --no-download-sd-model: the runner must not pass them (argparse would stop the start)."""
    folder = webui(tmp_path, {"modules/cmd_args.py": flags("--skip-prepare-environment", "--ckpt-dirs"),
                              "modules/paths_internal.py": flags("--data-dir", "--model-ref"),
                              "backend/args.py": flags("--cpu"), "modules_forge/__init__.py": "",
                              "README.md": '<h1 align="center">Stable Diffusion WebUI Forge - Neo</h1>\n',
                              "modules/launch_utils.py": 'VERSION_UID: Final[str] = "PY313"\n'})
    kind = host.detect(folder)
    assert kind.name == "Forge Neo" and not kind.ztsnr_key  # this fake has no backend/loader.py
    assert kind.start_flags() == ("--skip-prepare-environment", "--api", "--server-name", "127.0.0.1", "--cpu")
    assert kind.own_files_flags(folder) == ()  # this fake lacks --gradio-allowed-path
    data = run.data_folder(tmp_path / "work", "tests", kind, tmp_path / "ckpt.safetensors", None)
    # without its VERSION_UID, Neo takes the config.json for an old one and waits for Enter at start-up
    assert json.loads((data / "config.json").read_text()) == {"VERSION_UID": "PY313",
                                                              "sd_model_checkpoint": run.CHECKPOINT_NAME}


def test_a_webui_that_serves_only_allowed_paths_may_serve_its_own_folder(tmp_path):
    """Forge Neo's allowed paths default to --data-dir: without its own folder there, every script of its UI is 403."""
    folder = webui(tmp_path, {"modules/cmd_args.py": flags("--gradio-allowed-path", "--skip-prepare-environment"),
                              "modules/paths_internal.py": flags("--data-dir"), "backend/args.py": flags("--cpu"),
                              "modules_forge/__init__.py": "",
                              "README.md": '<h1 align="center">Stable Diffusion WebUI Forge - Neo</h1>\n'})
    assert host.detect(folder).own_files_flags(folder) == ("--gradio-allowed-path", str(folder))


def test_reforge_starts_without_live_previews(tmp_path):
    folder = webui(tmp_path, {"modules/cmd_args.py": A1111_ARGS + "\n" + flags("--always-cpu"),
                              "modules_forge/__init__.py": "", "README.md": "# Stable Diffusion WebUI reForge\n"})
    kind = host.detect(folder)
    assert kind.name == "reForge" and kind.options == {"live_previews_enable": False}


def test_a_folder_that_is_not_a_webui_is_refused_saying_why(tmp_path):
    with pytest.raises(ValueError, match="no launch.py and modules/scripts.py"):
        host.detect(tmp_path)
    with pytest.raises(ValueError, match="no --data-dir flag"):
        host.detect(webui(tmp_path, {"modules/cmd_args.py": flags("--ckpt")}))


def test_the_data_folder_links_the_checkout_checkpoint_and_files(tmp_path):
    kind = host.detect(webui(tmp_path, {"modules/cmd_args.py": A1111_ARGS}))
    oms = tmp_path / "oms"
    (oms / "a_module").mkdir(parents=True)
    (oms / "b.safetensors").write_text("x")
    checkpoint = tmp_path / "ckpt.safetensors"
    checkpoint.write_text("c")
    data = run.data_folder(tmp_path / "work", "tests", kind, checkpoint, oms)
    assert (data / "extensions" / host.EXTENSION_NAME).resolve() == host.REPO
    assert (data / "models" / "Stable-diffusion" / run.CHECKPOINT_NAME).resolve() == checkpoint
    assert sorted(p.name for p in (data / "models" / "oms").iterdir()) == ["a_module", "b.safetensors"]
    assert not (data / "models" / "oms").is_symlink()  # what tests write there stays out of the shared files
    assert json.loads((data / "config.json").read_text()) == {}  # --ckpt picks the checkpoint
    (data / "leftover").write_text("from an earlier run")
    assert not (run.data_folder(tmp_path / "work", "tests", kind, checkpoint, None) / "leftover").exists()


def test_a_snapshot_shows_every_change_but_pythons_caches(tmp_path):
    folder = tmp_path / "webui"
    (folder / "modules" / "__pycache__").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "modules" / "a.py").write_text("a")
    (folder / "venv" / "lib").mkdir(parents=True)
    before = host.snapshot(folder, skip=(folder / "venv",))
    (folder / "modules" / "__pycache__" / "a.pyc").write_text("compiled")
    (folder / "venv" / "lib" / "new.py").write_text("installed")
    assert host.changes(before, host.snapshot(folder, skip=(folder / "venv",))) == []
    (folder / "config.json").write_text('{"oms_x": 1}')  # same size as before would not matter: content is hashed
    (folder / "modules" / "a.py").unlink()
    (folder / "ui-config.json").write_text("{}")
    assert host.changes(before, host.snapshot(folder, skip=(folder / "venv",))) == [
        "added ui-config.json", "removed modules/a.py", "changed config.json"]


def test_files_the_webui_unpacks_from_its_own_archives_are_its_own_not_changes(tmp_path):
    """Forge Neo unpacks backend/huggingface/*.tokenizer.json.xz into nine tokenizer/tokenizer.json files below that
    folder on its first start, whatever --data-dir says: those are the WebUI's; anything else added is a change."""
    import lzma

    folder = tmp_path / "webui"
    archives = folder / "backend" / "huggingface"
    archives.mkdir(parents=True)
    (archives / "wan.tokenizer.json.xz").write_bytes(lzma.compress(b'{"wan": 1}'))
    (archives / "z.tokenizer.json.xz").write_bytes(lzma.compress(b'{"z": 2}'))
    (archives / "notes.txt.xz").write_bytes(lzma.compress(b"notes"))
    before = host.snapshot(folder)
    unpacked = archives / "Wan-AI" / "Wan2.1-T2V-14B" / "tokenizer" / "tokenizer.json"
    unpacked.parent.mkdir(parents=True)
    unpacked.write_bytes(b'{"wan": 1}')
    z_image = archives / "Tongyi-MAI" / "Z-Image-Turbo" / "tokenizer" / "tokenizer.json"
    z_image.parent.mkdir(parents=True)
    z_image.write_bytes(b'{"z": 2}')
    written = archives / "other" / "tokenizer.json"  # named as an unpacked file, with other bytes: a change
    written.parent.mkdir()
    written.write_bytes(b'{"made": "by a test"}')
    (folder / "tokenizer.json").write_bytes(b'{"wan": 1}')  # the archive is not in its folder or above it
    (folder / "notes.txt").write_bytes(b"notes")  # the same: an archive below a file does not count
    after = host.snapshot(folder)
    own = host.own_unpacked(folder, before, after)
    assert own == {"backend/huggingface/Tongyi-MAI/Z-Image-Turbo/tokenizer/tokenizer.json":
                   "backend/huggingface/z.tokenizer.json.xz",
                   "backend/huggingface/Wan-AI/Wan2.1-T2V-14B/tokenizer/tokenizer.json":
                   "backend/huggingface/wan.tokenizer.json.xz"}
    assert host.changes(before, after, exempt=frozenset(own)) == [
        "added backend/huggingface/other/tokenizer.json", "added notes.txt", "added tokenizer.json"]
    for name in ("z.tokenizer.json.xz", "wan.tokenizer.json.xz"):  # archives the run changed: not the WebUI's own
        (archives / name).write_bytes(lzma.compress(b'{"changed": true}'))
    assert host.own_unpacked(folder, before, host.snapshot(folder)) == {}


@pytest.mark.parametrize("existed", [True, False])
def test_what_the_webui_writes_in_its_own_tree_is_put_back_even_when_the_run_fails(tmp_path, existed):
    """Forge Classic updates config_states/cache.db in its own folder at every start, whatever --data-dir says."""
    folder = tmp_path / "webui"
    states = folder / "config_states"
    folder.mkdir()
    if existed:
        states.mkdir()
        (states / "cache.db").write_bytes(b"the user's cache")
        (states / "2024-01-01.json").write_text("{}")
    before = host.snapshot(folder)
    with pytest.raises(RuntimeError, match="the server failed"):
        with host.kept_as_found(folder, tmp_path / "spare"):
            states.mkdir(exist_ok=True)
            (states / "cache.db").write_bytes(b"written by the WebUI")
            (states / "new.json").write_text("{}")
            raise RuntimeError("the server failed")
    assert host.changes(before, host.snapshot(folder)) == [] and states.is_dir() == existed
    assert not (tmp_path / "spare").exists()


def test_a_git_clone_names_its_commit(tmp_path):
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    assert host.commit_of(tmp_path) is None
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text("# pack-refs\n82a973c04367123 refs/heads/main\n")
    assert host.commit_of(tmp_path) == "82a973c04367"
    (git / "HEAD").write_text("1f95d7171234567890\n")
    assert host.commit_of(tmp_path) == "1f95d7171234"


def test_pytest_counts_are_read_from_junit(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text('<testsuites><testsuite tests="10" failures="1" errors="1" skipped="3"/></testsuites>')
    assert run.pytest_counts(junit) == {"passed": 5, "failed": 2, "skipped": 3}
    assert run.pytest_counts(tmp_path / "none.xml") == {"passed": 0, "failed": 0, "skipped": 0}


def sdnext(tmp_path: Path, installer_flags: tuple[str, ...] = ("--skip-all", "--quick")) -> Path:
    """SD.Next as the runner sees it: A1111's launch.py and modules/scripts.py, its diffusers processing and script
    manager, its cmd_args.py (with --ckpt, and --api-only beside --api-log, so "--api" would be ambiguous) and its
    installer.py defining the install flags, written as SD.Next writes them."""
    install = "\n".join(f"    group_install.add_argument('{name}', default=env_flag(\"X\", False), action='store_true')"
                        for name in installer_flags)
    return webui(tmp_path, {"modules/cmd_args.py": flags("--ckpt", "--data-dir", "--log", "--use-cpu", "--api-only",
                                                         "--api-log"),
                            "installer.py": f"def add_args(parser):\n{install}\n",
                            "modules/processing_diffusers.py": "", "modules/scripts_manager.py": ""})


def test_sdnext_is_recognised_and_started_offline_with_a_diffusers_model(tmp_path):
    kind = host.detect(sdnext(tmp_path))
    assert kind.name == "SD.Next" and kind.sdnext and not kind.forge_family and not kind.can_make_checkpoint
    assert kind.start_flags() == ("--skip-all", "--server-name", "127.0.0.1")  # no "--api", no CPU flag
    assert "--ckpt" not in kind.flags  # its --ckpt fails for a diffusers folder: the settings choose the model
    assert kind.test_set() == () and kind.start_timeout_s > 900
    model = tmp_path / "assets" / host.SDNEXT_MODEL
    model.mkdir(parents=True)
    oms = tmp_path / "assets" / "oms"
    oms.mkdir()
    data = run.data_folder(tmp_path / "work", "tests", kind, model, oms)
    assert (data / "extensions" / host.EXTENSION_NAME).resolve() == host.REPO
    assert (data / "models" / "Diffusers" / host.SDNEXT_MODEL).resolve() == model
    assert not (data / "models" / "Stable-diffusion").exists() and (data / "models" / "oms").is_dir()
    assert json.loads((data / "config.json").read_text()) == {"offline_mode": True,
                                                              "sd_model_checkpoint": f"Diffusers/{host.SDNEXT_MODEL}"}
    # its offline mode sets HF_HUB_OFFLINE, which keeps One More Step from downloading: not on the first-use day
    first_use = run.data_folder(tmp_path / "work", "first-use", kind, model, None)
    assert json.loads((first_use / "config.json").read_text())["offline_mode"] is False
    assert kind.data_flags(data) == ("--log", str(data / "sdnext.log"))  # else it logs into its own folder


def test_sdnext_without_its_offline_flag_is_refused_saying_why(tmp_path):
    with pytest.raises(ValueError, match="--skip-all"):
        host.detect(sdnext(tmp_path, installer_flags=("--quick",)))


def test_other_webuis_take_no_sdnext_flags(tmp_path):
    kind = host.detect(webui(tmp_path, {"modules/cmd_args.py": A1111_ARGS}))
    assert not kind.sdnext and kind.data_flags(tmp_path) == () and kind.start_timeout_s == 900


def test_a_webui_whose_loader_reads_a_ztsnr_key_gets_a_checkpoint_with_one(tmp_path):
    """Forge Neo's backend/loader.py turns on zero-terminal SNR for a checkpoint with a "ztsnr" key: the runner then
    makes such a checkpoint, the test checkpoint's tensors and that key, for test_webui_forge_neo.py."""
    from safetensors.torch import load_file, save_file

    folder = webui(tmp_path, {"modules/paths_internal.py": flags("--data-dir"), "modules_forge/__init__.py": "",
                              "backend/loader.py": '    guess.ztsnr = "ztsnr" in sd\n'})
    assert host.detect(folder).ztsnr_key
    source = tmp_path / "plain.safetensors"
    save_file({"w": torch.arange(3.0)}, str(source))
    made = assets.make_ztsnr_checkpoint(tmp_path / "z.safetensors", source)
    tensors = load_file(made)
    assert set(tensors) == {"w", "ztsnr"} and torch.equal(tensors["w"], torch.arange(3.0))


def test_the_first_use_hub_serves_the_released_module_and_text_encoder_repositories(tmp_path):
    from lib_oms.catalog import RELEASED_MODULES
    from lib_oms.download import TEXT_ENCODER_REPOS

    encoder = tmp_path / "oms" / "text_encoder"
    encoder.mkdir(parents=True)
    (encoder / "config.json").write_text("{}")
    (encoder / "model.safetensors").write_bytes(b"weights")
    repos = assets.first_use_repos(tmp_path / "oms")
    assert set(repos) == {RELEASED_MODULES["sd"].repo, TEXT_ENCODER_REPOS[0]}
    assert repos[TEXT_ENCODER_REPOS[0]]["text_encoder/model.fp16.safetensors"] == b"weights"
    assert any(path.endswith("diffusion_pytorch_model.fp16.safetensors") for path in repos[RELEASED_MODULES["sd"].repo])
