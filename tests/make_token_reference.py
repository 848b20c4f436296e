"""Freezes the official OMS tokenization into tests/data/clip_token_ids.json (run by hand; the tests only read it).

The released pipeline tokenizes with transformers' slow ``CLIPTokenizer`` loaded from an SD 2.x ``tokenizer``
folder (an assumption: the release's tokenizer pointer was not seen; SD 2.1's is inferred from its pad id 0), and
the SDXL "mixclip" module with SDXL's two tokenizers. Both kinds are built here offline, with
``CLIPTokenizer.from_pretrained`` as the pipeline loads them, from the CLIP vocabulary that ships with open_clip
(the same BPE the CLIP vocab.json/merges.txt hold) and the special-token files of

- SD 2.1 ``tokenizer`` and SDXL ``tokenizer_2``: pad token "!" (special, so every "!" becomes id 0);
- openai/clip-vit-large-patch14 (SD 1.x, SDXL ``tokenizer``): pad token "<|endoftext|>".

Run with transformers 4.30.2 (the WebUI's pin, in .venv-test):  .venv-test/bin/python -m tests.make_token_reference
"""

from __future__ import annotations

import gzip
import json
import random
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "data" / "clip_token_ids.json"
SEED = 20261130
RANDOM_PROMPTS = 250

# Prompts named in issue 9 (and the kinds it says tokenize identically), then seeded random ones.
NAMED = [
    "Hello World!!! what a view!",
    "!",
    "!!",
    "wow!a cat?! really !!! yes!.",
    "",
    "a photo of a cat",
    "it's the cat's toy, isn't it? they'll've gone",
    "l’été à Paris, naïve café, 東京の夜景, Ελλάδα, emoji 🐱🌃",
    "an oil painting of a lighthouse at dusk, " * 12,
    "UPPER case and MiXeD, <|endoftext|> inside, <|ENDOFTEXT|> too, <|startoftext|>",
    "tab\tnew\nline   spaces,  and\u00a0nbsp",
    "&amp; &lt;b&gt; &#33; &amp;amp; html entities",
    "fullwidth ！ and ﹗ bangs, mojibake cafÃ© and â€œquotesâ€\x9d",
    "100% 3.5 1,000 2nd 21st-century (dark:1.3) [snow|ice] {x} <lora:a:1>",
]

PIECES = [
    "!", "!!", "!!!", "?!", "!?", "!.", " ! ", "a!", "!b", "'s", "'t", "’s", "n't", "'ll", "'ve", "'re", "'d", "'m",
    "dark", "bright", "night", "sunset", "cat", "alley", "rain", "neon", "portrait", "of", "a", "the", "in", "at",
    "Masterpiece", "HDR", "8k", "4K", "1girl", "1.5", "(", ")", "[", "]", ":", ",", ".", "-", "_", "/", "\\", "#",
    "&amp;", "&#33;", "&lt;", "é", "ü", "ß", "ñ", "日本", "夜", "ñandú", "Ω", "🙂", "🌃", "—", "…", "“", "”", "«", "»",
    "！", "\t", "\n", "  ", "<|endoftext|>", "<|startoftext|>", "İstanbul", "ﬁne", "Ⅻ", "½", "²", "x²", "ÃŸ",
]


def random_prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        words = [rng.choice(PIECES) for _ in range(rng.randint(1, 90 if rng.random() < 0.15 else 25))]
        joiners = [rng.choice(["", " ", " ", " ", ", "]) for _ in words]
        prompts.append("".join(w + j for w, j in zip(words, joiners, strict=True)))
    return prompts


def clip_vocabulary(folder: Path) -> None:
    """vocab.json and merges.txt of CLIP, built from open_clip's BPE file exactly as CLIP's own files are laid out."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    units = list(bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def tokenizer(folder: Path, pad_token: str):
    """The slow CLIPTokenizer from a tokenizer folder with the given pad token (as in the SD repos' files)."""
    from transformers import CLIPTokenizer

    specials = {"bos_token": special("<|startoftext|>"), "eos_token": special("<|endoftext|>"),
                "unk_token": special("<|endoftext|>"), "pad_token": pad_token}
    in_config = {key: {"__type": "AddedToken", **value} if isinstance(value, dict) else value
                 for key, value in specials.items()}
    config = {**in_config, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer", "add_prefix_space": False}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder))


def main() -> None:
    import transformers

    prompts = NAMED + random_prompts(RANDOM_PROMPTS, SEED)
    reference = {"transformers": transformers.__version__, "seed": SEED, "pad_ids": {}, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = {}
        for name, pad in (("sd2", "!"), ("clip_l", "<|endoftext|>")):
            folder = Path(tmp) / name
            folder.mkdir()
            clip_vocabulary(folder)
            tokenizers[name] = tokenizer(folder, pad)
            reference["pad_ids"][name] = tokenizers[name].pad_token_id
        for prompt in prompts:
            case = {"prompt": prompt}
            for name, tok in tokenizers.items():
                ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
                assert len(ids) == 77
                pad = tok.pad_token_id
                while ids and ids[-1] == pad:  # stored without the trailing padding (the test pads again)
                    ids = ids[:-1]
                case[name] = ids
            reference["cases"].append(case)
    cases = ",\n".join(json.dumps(case, ensure_ascii=False) for case in reference.pop("cases"))
    head = json.dumps(reference)[:-1]
    OUT.write_text(f'{head}, "cases": [\n{cases}\n]}}\n', encoding="utf-8")  # one case a line
    print(f"wrote {len(prompts)} cases to {OUT}")


if __name__ == "__main__":
    main()
