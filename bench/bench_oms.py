"""How much One More Step adds to a generation, every figure measured side by side in one run.

Random weights (speed does not depend on their values) and nothing beyond torch and transformers: the base UNet
is lib_oms's network at the checkpoint's sizes with diffusers' time conditioning (bench/base_unet.py), the OMS
module is OMS-B loaded through lib_oms.load_module, the text encoder is OpenCLIP ViT-H/14's text tower as a
transformers CLIPTextModel built from lib_oms's own architecture. Without open_clip (the GPU machine) prompts are
tokenized by a stand-in that gives one id per word; the real tokenizer's cost is measured where it is installed.

    python bench/bench_oms.py                        # SD 1.5 512 px and SDXL 1024 px on the GPU, fp16
    python bench/bench_oms.py --device cpu           # SD 1.5 at batch 1 on the CPU, fp32
    python bench/bench_oms.py --tiny                 # tiny networks: checks the benchmark itself in seconds
    python bench/bench_oms.py --speed-options        # also OMS-B with channels-last and torch.compile (GPU)

Per base model and batch size it times: the base UNet's CFG step; the official-style eager OMS step (the
published anchor: both prompts encoded by transformers' own forward every generation, the network at batch 2b
whatever the OMS CFG); this project's oms_start with a new prompt every generation and with a cached one, at OMS
CFG 1 and 2; the parts (network and encoder, eager and CUDA graph); GPU memory with and without OMS.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import resource
import statistics
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from base_unet import TimedUNet  # noqa: E402

from lib_oms import text_encoders  # noqa: E402
from lib_oms.catalog import OPENCLIP_H  # noqa: E402
from lib_oms.engine import oms_start  # noqa: E402
from lib_oms.module_files import load_module, save_module  # noqa: E402
from lib_oms.step import SamplerStart  # noqa: E402
from lib_oms.text_encoders import (  # noqa: E402
    OPENCLIP_PAD_ID,
    OPENCLIP_VIT_H14,
    PromptEmbeddingCache,
    TowerSpec,
    clip_text_config,
    load_openclip_text_encoder,
    tokenize,
)
from lib_oms.unet import OMSUNet, normalize_unet_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
MIB = 2**20
SIGMA_MAX = 14.614641  # SD's first k-diffusion noise level
# name: (label, config file, latent side, pixels)
BASES = {"sd15": ("SD 1.5", "sd15_unet.json", 64, 512), "sdxl": ("SDXL", "sdxl_unet.json", 128, 1024)}
# the targets (GPU, fp16): % of a 20-step generation, and extra GPU memory at SD 1.5 512 px
TARGETS = {("sd15", 1): 0.5, ("sdxl", 1): 0.3, ("sd15", 2): 1.0, ("sdxl", 2): 1.0}
TARGET_EXTRA_GIB = 1.2

TINY_TOWER = TowerSpec("tiny OpenCLIP", width=64, layers=3, heads=4, intermediate=256, hidden_act="gelu")
TINY_BASES = {
    "sd15": {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 48,
             "attention_head_dim": 2, "layers_per_block": 1, "norm_num_groups": 8},
    "sdxl": {"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 64,
             "attention_head_dim": [2, 4], "transformer_layers_per_block": [1, 2], "layers_per_block": 1,
             "norm_num_groups": 8, "use_linear_projection": True, "addition_embed_type": "text_time",
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8},
}
TINY_SIDE = 16


def read_config(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


@dataclass
class Sizes:
    """What one run builds: base UNet configs and latent sides, the OMS config, the text tower."""

    bases: dict[str, tuple[dict, int]]
    oms_config: dict
    tower: TowerSpec
    tower_blocks: int

    @classmethod
    def real(cls, names: list[str]) -> Sizes:
        return cls({name: (read_config(BASES[name][1]), BASES[name][2]) for name in names},
                   read_config("oms_b_unet.json"), OPENCLIP_VIT_H14, OPENCLIP_VIT_H14.layers - 1)

    @classmethod
    def tiny(cls, names: list[str]) -> Sizes:
        oms = {**read_config("oms_b_unet.json"), "block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4],
               "cross_attention_dim": TINY_TOWER.width}
        return cls({name: (TINY_BASES[name], TINY_SIDE) for name in names}, oms, TINY_TOWER, TINY_TOWER.layers - 1)


class WordIds:
    """Stands in for the CLIP tokenizer where open_clip is not installed: one id per word, from its CRC."""

    @staticmethod
    def encode_prompt(prompt: str, pad_id: int) -> list[int]:
        return [300 + zlib.crc32(word.encode()) % 40000 for word in prompt.split()]


def use_tokenizer() -> str:
    """open_clip's BPE (what the extension runs) when installed, else the stand-in; returns which."""
    if importlib.util.find_spec("open_clip") is not None:
        return "open_clip BPE"
    text_encoders.encode_prompt = WordIds.encode_prompt  # tokenize() looks encode_prompt up at each call
    return "stand-in (open_clip not installed): one id per word"


class Timer:
    def __init__(self, device: torch.device, repeats: int, warmups: int):
        self.device, self.repeats, self.warmups = device, repeats, warmups

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> float:
        """Median milliseconds per call of ``fn`` (each call waited for), after warm-up calls."""
        for _ in range(self.warmups):
            fn()
        times = []
        for _ in range(self.repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000


def settled_reserved_mib(device: torch.device) -> float:
    """GPU memory torch holds once its caches are emptied (what OMS really keeps: weights and graph pools)."""
    torch.cuda.synchronize(device)
    gc.collect()
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(device) / MIB


class Prompts:
    """A new prompt at every call (a user changing the prompt for each generation), or always the same ones."""

    def __init__(self):
        self.counter = itertools.count()

    def new(self, batch: int) -> list[str]:
        return [f"a lighthouse on a cliff at night, storm, photo number {next(self.counter)}" for _ in range(batch)]

    @staticmethod
    def cached(batch: int) -> list[str]:
        return [f"a black cat in a dark room, image {i}" for i in range(batch)]


class Bench:
    def __init__(self, args, sizes: Sizes):
        self.device = torch.device(args.device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.gpu = self.device.type == "cuda"
        self.timer = Timer(self.device, args.repeats or (20 if self.gpu else 3), 5 if self.gpu else 1)
        self.sizes, self.steps, self.args = sizes, args.steps, args
        self.rows: list[dict] = []
        self.memory: dict[str, dict] = {}
        self.prompts = Prompts()
        self.tokenizer = use_tokenizer()
        self.load_ms = self._load_oms()

    def log(self, message: str) -> None:
        print(f"[bench] {message}", flush=True)

    # -- building --------------------------------------------------------------------------------------------

    def _load_oms(self) -> float:
        """The OMS module (through a saved fp16 file, as users get it) and the text encoder, on the device."""
        config = normalize_unet_config(self.sizes.oms_config, "OMS config")
        with torch.device(self.device):  # random weights made where they run: much faster than on the CPU
            network = OMSUNet(config).eval()
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_module(Path(tmp) / "oms_b_bench_15_21", network, config, latent_space="sd",
                                 text_encoder=OPENCLIP_H, fp16=True)
            del network
            start = time.perf_counter()
            self.module = load_module(folder, device=self.device, dtype=self.dtype)
            self.timer.sync()
            load_ms = (time.perf_counter() - start) * 1000
        from transformers import CLIPTextModel

        with torch.device(self.device):
            tower = CLIPTextModel(clip_text_config(self.sizes.tower, self.sizes.tower_blocks)).state_dict()
        self.encoder = load_openclip_text_encoder(tower, device=self.device, dtype=self.dtype, spec=self.sizes.tower)
        del tower
        return load_ms

    def base_unet(self, config: dict) -> TimedUNet:
        with torch.device(self.device):
            return TimedUNet(config).to(self.dtype).eval()

    # -- one base model --------------------------------------------------------------------------------------

    def add(self, base: str, what: str, batch: int, ms: float, cfg: float | None = None) -> dict:
        row = {"base": base, "what": what, "batch": batch, "cfg": cfg, "ms": ms}
        self.rows.append(row)
        self.log(f"{base} batch {batch}{'' if cfg is None else f' CFG {cfg:g}'}: {what}: {ms:.2f} ms")
        return row

    def base_step(self, unet: TimedUNet, side: int, images: int):
        """One CFG step of the base model for ``images`` images (the UNet at batch 2·images)."""
        batch = 2 * images
        x = torch.randn(batch, 4, side, side, device=self.device, dtype=self.dtype)
        context = torch.randn(batch, 77, unet.unet.config["cross_attention_dim"], device=self.device, dtype=self.dtype)
        t = torch.full((batch,), 999, device=self.device)
        added = {}
        if unet.add_embedding is not None:
            pixels = side * 8
            added = {"text_embeds": torch.randn(batch, unet.pooled_width, device=self.device, dtype=self.dtype),
                     "time_ids": torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * batch, device=self.device)}
        return lambda: unet(x, t, context, **added)

    def oms_step(self, side: int, batch: int, cfg: float, prompts) -> callable:
        """This project's step as the extension runs it: ``oms_start`` with the cached encoder."""
        noise = torch.randn(batch, 4, side, side, device=self.device)
        z = torch.randn(batch, 4, side, side, device=self.device)
        cache = self.cache
        start = SamplerStart.k_diffusion(SIGMA_MAX)
        return lambda: oms_start(self.module, cache, noise, prompts(batch), start=start, cfg=cfg, z=z)

    def official_step(self, side: int, batch: int) -> callable:
        """The official pipeline's work per generation: prompt and "" through transformers' own forward, then the
        network eagerly at batch 2·batch (it always runs the unconditional half, whatever the OMS CFG)."""
        x = torch.randn(2 * batch, 4, side, side, device=self.device, dtype=self.dtype)
        model, network = self.encoder.model, self.module.unet

        def step():
            ids = tokenize(self.prompts.new(batch) + [""] * batch, pad_id=OPENCLIP_PAD_ID).to(self.device)
            context = model(input_ids=ids).last_hidden_state
            return network(x, context)
        return step

    def measure_base(self, name: str) -> None:
        config, side = self.sizes.bases[name]
        timed = self.timer
        self.module.to("cpu")  # memory without OMS first
        self.encoder.to("cpu")
        unet = self.base_unet(config)
        steps = {}
        for images in self.args.batches:
            step = self.base_step(unet, side, images)
            if self.gpu and images == 1:
                settled_reserved_mib(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            steps[images] = self.add(name, "base UNet, one CFG step", images, timed(step))["ms"]
            if self.gpu and images == 1:
                self.memory[name] = {"peak_allocated_without_mib": torch.cuda.max_memory_allocated(self.device) / MIB,
                                     "reserved_without_mib": settled_reserved_mib(self.device)}
        self.module.to(self.device)
        self.encoder.to(self.device)
        self.cache = PromptEmbeddingCache(self.encoder)

        for images in self.args.batches:
            generation = self.steps * steps[images]

            def add(what, ms, cfg=None, images=images, generation=generation):
                self.add(name, what, images, ms, cfg)["percent"] = ms / generation * 100

            for n in sorted({images, 2 * images}):
                x = torch.randn(n, 4, side, side, device=self.device, dtype=self.dtype)
                context = torch.randn(n, 77, self.sizes.tower.width, device=self.device, dtype=self.dtype)
                ids = tokenize(Prompts.cached(n), pad_id=OPENCLIP_PAD_ID)
                add(f"OMS network, eager, batch {n}", timed(lambda x=x, c=context: self.module.unet(x, c)))
                add(f"text encoder, transformers forward, {n} prompt(s)",
                    timed(lambda ids=ids: self.encoder.model(input_ids=ids.to(self.device)).last_hidden_state))
                if self.gpu:
                    add(f"OMS network, CUDA graph, batch {n}", timed(lambda x=x, c=context: self.module.forward(x, c)))
                    add(f"text encoder, CUDA graph, {n} prompt(s)", timed(lambda ids=ids: self.encoder.features(ids)))
            add("official-style eager step (anchor)", timed(self.official_step(side, images)))
            for cfg in (1.0, 2.0):
                add("this project, new prompt", timed(self.oms_step(side, images, cfg, self.prompts.new)), cfg)
                add("this project, cached prompt", timed(self.oms_step(side, images, cfg, Prompts.cached)), cfg)

        if self.gpu:
            self.measure_memory(name, unet, side)
        del unet
        gc.collect()

    def measure_memory(self, name: str, unet: TimedUNet, side: int) -> None:
        """Peak of a whole generation (OMS step, new prompt, CFG 1, batch 1, then a base step) with OMS resident."""
        self.module.release_graphs()
        self.encoder.release_graphs()
        oms, step = self.oms_step(side, 1, 1.0, self.prompts.new), self.base_step(unet, side, 1)
        oms()
        oms()  # the graphs this setting needs are captured
        reserved = settled_reserved_mib(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        oms()
        step()
        torch.cuda.synchronize(self.device)
        memory = self.memory[name]
        memory.update(peak_allocated_with_mib=torch.cuda.max_memory_allocated(self.device) / MIB,
                      reserved_with_mib=reserved)
        memory["extra_peak_allocated_mib"] = memory["peak_allocated_with_mib"] - memory["peak_allocated_without_mib"]
        memory["extra_reserved_mib"] = memory["reserved_with_mib"] - memory["reserved_without_mib"]
        self.log(f"{name} memory: {json.dumps({k: round(v) for k, v in memory.items()})}")

    # -- GPU speed options of the OMS network ----------------------------------------------------------------

    def speed_options(self) -> dict:
        results = {}
        variants = [("default", {}), ("channels-last", {"channels_last": True})]
        if self.args.compile:
            variants += [("torch.compile", {"compile": True}),
                         ("torch.compile + channels-last", {"compile": True, "channels_last": True})]
        self.module.to(self.device)
        sides = sorted({side for _config, side in self.sizes.bases.values()})
        for label, options in variants:
            self.module.set_speed_options(**options)
            for side, batch in itertools.product(sides, (1, 2)):
                if options.get("compile") and (side, batch) != (sides[0], 1):
                    continue  # each shape compiles for a minute or more: the smallest only
                x = torch.randn(batch, 4, side, side, device=self.device, dtype=self.dtype)
                context = torch.randn(batch, 77, self.sizes.tower.width, device=self.device, dtype=self.dtype)
                start = time.perf_counter()
                first = self.module.forward(x, context)  # compiles and captures
                self.timer.sync()
                first_ms = (time.perf_counter() - start) * 1000
                ms = self.timer(lambda x=x, c=context: self.module.forward(x, c))
                results[f"{label}, {side}x{side}, batch {batch}"] = {"ms": ms, "first_call_ms": first_ms,
                                                                     "max_abs_vs_eager": self._error(first, x, context)}
                self.log(f"speed option {label}, {side}x{side}, batch {batch}: {ms:.2f} ms "
                         f"(first call {first_ms:.0f} ms)")
        self.module.set_speed_options()
        return results

    def _error(self, out: torch.Tensor, x: torch.Tensor, context: torch.Tensor) -> float:
        with torch.no_grad():
            return (out.float() - self.module.unet(x, context).float()).abs().max().item()


def tokenize_ms(repeats: int = 200) -> float | None:
    """Milliseconds to tokenize one new prompt with open_clip's BPE (CPU work, the same on every machine)."""
    if importlib.util.find_spec("open_clip") is None:
        return None
    prompts = [f"a lighthouse on a cliff at night, storm, photo number {i}" for i in range(repeats)]
    tokenize(prompts[:1], pad_id=OPENCLIP_PAD_ID)  # loads the vocabulary
    start = time.perf_counter()
    for prompt in prompts:
        tokenize([prompt], pad_id=OPENCLIP_PAD_ID)
    return (time.perf_counter() - start) / repeats * 1000


def report(bench: Bench, results: dict) -> None:
    print(f"\nOne More Step benchmark: {results['device']}, {results['dtype']}, torch {results['torch']}, "
          f"tokenizer: {results['tokenizer']}\n")
    print(f"| {'base':<6} | {'batch':>5} | {'OMS CFG':>7} | {'what':<52} | {'ms':>9} | {'% of gen.':>9} |")
    print(f"|{'-' * 8}|{'-' * 7}|{'-' * 9}|{'-' * 54}|{'-' * 11}|{'-' * 11}|")
    for row in results["rows"]:
        cfg = "" if row["cfg"] is None else f"{row['cfg']:g}"
        percent = f"{row['percent']:.2f} %" if "percent" in row else ""
        print(f"| {row['base']:<6} | {row['batch']:>5} | {cfg:>7} | {row['what']:<52} | {row['ms']:>9.2f} | "
              f"{percent:>9} |")
    print(f"\n(% of a {bench.steps}-step generation: {bench.steps} base UNet CFG steps of the same batch)")
    print(f"module load, fp16 file -> device, incl. SHA-256: {results['module_load_ms']:.0f} ms")
    if results["tokenize_one_prompt_ms"] is not None:
        print(f"tokenizing one new prompt (open_clip BPE, CPU): {results['tokenize_one_prompt_ms']:.3f} ms")
    for name, memory in results["memory"].items():
        print(f"{name} GPU memory: peak allocated {memory['peak_allocated_without_mib']:.0f} MiB without OMS, "
              f"{memory['peak_allocated_with_mib']:.0f} MiB with (+{memory['extra_peak_allocated_mib']:.0f}); "
              f"held after the step +{memory['extra_reserved_mib']:.0f} MiB (weights, graphs)")
    for label, figures in results["speed_options"].items():
        how = " (CUDA graph)" if bench.gpu else ""
        print(f"OMS network{how}, {label}: {figures['ms']:.2f} ms (first call {figures['first_call_ms']:.0f} ms, "
              f"max |diff| to eager {figures['max_abs_vs_eager']:.1e})")
    for line in results["targets"]:
        print(line)
    if results["peak_rss_mib"]:
        print(f"peak process RSS: {results['peak_rss_mib']:.0f} MiB")


def targets(results: dict) -> list[str]:
    """The issue's targets against this run's figures (GPU only)."""
    lines = []
    for row in results["rows"]:
        goal = TARGETS.get((row["base"], row["cfg"]))
        if goal is not None and row["what"] == "this project, new prompt" and row["batch"] == 1:
            verdict = "met" if row["percent"] <= goal else "MISSED"
            lines.append(f"target {row['base']} new prompt OMS CFG {row['cfg']:g}, batch 1: "
                         f"{row['percent']:.2f} % <= {goal} %: {verdict}")
    memory = results["memory"].get("sd15")
    if memory:
        extra = max(memory["extra_peak_allocated_mib"], memory["extra_reserved_mib"]) / 1024
        lines.append(f"target sd15 extra GPU memory: {extra:.2f} GiB <= {TARGET_EXTRA_GIB} GiB: "
                     f"{'met' if extra <= TARGET_EXTRA_GIB else 'MISSED'}")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base", choices=[*BASES, "all"], default=None,
                        help="base model(s) (default: all on a GPU, sd15 on the CPU)")
    parser.add_argument("--batches", default=None, help="images per batch, e.g. 1,4 (default: 1,4 on a GPU, 1 on "
                        "the CPU)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of the generation OMS is added to")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
    parser.add_argument("--tiny", action="store_true", help="tiny networks: checks the benchmark in seconds")
    parser.add_argument("--speed-options", action="store_true",
                        help="also time the OMS network's speed options (through CUDA graphs on a GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="with --speed-options: also torch.compile (smallest latent, batch 1: compiling is slow)")
    parser.add_argument("--options-only", action="store_true", help="time only the speed options, no base model")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    args.base = args.base or ("all" if gpu else "sd15")
    batches = args.batches or ("1,4" if gpu else "1")
    try:
        args.batches = [int(b) for b in batches.split(",")]
    except ValueError:
        args.batches = []
    if not args.batches or any(b < 1 for b in args.batches):
        parser.error(f"--batches must list positive integers like 1,4, got {batches!r}")
    args.speed_options = args.speed_options or args.options_only
    if args.compile and not args.speed_options:
        parser.error("--compile is an option of --speed-options")
    return args


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    names = list(BASES) if args.base == "all" else [args.base]
    sizes = Sizes.tiny(names) if args.tiny else Sizes.real(names)
    bench = Bench(args, sizes)
    for name in [] if args.options_only else names:
        bench.measure_base(name)
    device = bench.device
    results = {
        "device": torch.cuda.get_device_name(device) if bench.gpu else f"CPU ({torch.get_num_threads()} threads)",
        "dtype": str(bench.dtype), "torch": torch.__version__, "tokenizer": bench.tokenizer, "tiny": args.tiny,
        "steps": args.steps, "rows": bench.rows, "memory": bench.memory, "module_load_ms": bench.load_ms,
        "tokenize_one_prompt_ms": tokenize_ms(),
        "speed_options": bench.speed_options() if args.speed_options else {},
        "peak_rss_mib": None if bench.gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    results["targets"] = targets(results) if bench.gpu and not args.tiny else []
    report(bench, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
