"""The demo's tiny text encoder: a fixed word vocabulary, learned word and position embeddings, a layer norm.

It follows the project's text-encoder protocol (``kind``, ``width``, ``max_length``, ``encode(list[str])``), so
lib_oms.engine and the trainer use it exactly as they use OpenCLIP-H. Its embeddings are learned together with the
demo's base denoiser and then frozen, as SD's text encoder is frozen when an OMS module is trained.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import TextEncoderError
from .world import VOCABULARY

KIND = "demo-words"
PAD, UNKNOWN = 0, 1


class DemoTextEncoder(nn.Module):
    """Words to [B, max_length, width] embeddings; unknown words share one token, short captions are padded."""

    kind = KIND

    def __init__(self, vocabulary: tuple[str, ...] = VOCABULARY, width: int = 64, max_length: int = 16):
        super().__init__()
        self.vocabulary = tuple(vocabulary)
        self.width, self.max_length = int(width), int(max_length)
        self.ids = {word: index + 2 for index, word in enumerate(self.vocabulary)}
        self.token_embedding = nn.Embedding(len(self.vocabulary) + 2, self.width)
        self.position_embedding = nn.Embedding(self.max_length, self.width)
        self.final_layer_norm = nn.LayerNorm(self.width)
        nn.init.normal_(self.token_embedding.weight, std=0.5)
        nn.init.normal_(self.position_embedding.weight, std=0.1)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, max_length]: lower-cased words, cut at max_length, padded with 0."""
        rows = []
        for prompt in prompts:
            words = re.findall(r"[a-z]+", prompt.lower())[: self.max_length]
            ids = [self.ids.get(word, UNKNOWN) for word in words]
            rows.append(ids + [PAD] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.token_embedding.weight.device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(self.max_length, device=tokens.device)
        return self.final_layer_norm(self.token_embedding(tokens) + self.position_embedding(positions))

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """The protocol's call: prompts to hidden states [B, max_length, width] (no gradient)."""
        with torch.no_grad():
            return self(self.tokenize(list(prompts)))

    def metadata(self) -> dict[str, str]:
        return {"kind": KIND, "vocabulary": json.dumps(self.vocabulary), "width": str(self.width),
                "max_length": str(self.max_length)}


def save_text_encoder(encoder: DemoTextEncoder, path: str | Path) -> Path:
    """Write the encoder as one fp32 .safetensors file; its vocabulary and sizes go in the file's metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().float().contiguous().cpu() for key, value in encoder.state_dict().items()}
    save_file(state, str(path), metadata=encoder.metadata())
    return path


def load_text_encoder(path: str | Path, device: str | torch.device = "cpu") -> DemoTextEncoder:
    """Read a file written by :func:`save_text_encoder`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TextEncoderError(f"demo text encoder not found: {path}; run `python -m lib_oms.demo.reproduce` "
                               "to make it")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("kind") != KIND:
            raise TextEncoderError(f"{path} is not a {KIND} text encoder (metadata kind={meta.get('kind')!r})")
        encoder = DemoTextEncoder(tuple(json.loads(meta["vocabulary"])), int(meta["width"]), int(meta["max_length"]))
        encoder.load_state_dict(load_file(str(path)))
    except TextEncoderError:
        raise
    except Exception as error:  # corrupt file, missing keys or metadata
        raise TextEncoderError(f"cannot read the demo text encoder {path}: {error}; re-create it with "
                               "`python -m lib_oms.demo.reproduce`") from error
    return encoder.to(device).eval().requires_grad_(False)
