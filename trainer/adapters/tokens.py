"""New tokens for pivotal tuning: textual inversion rows trained beside a frozen embedding table.

Each text encoder's token table is wrapped in :class:`ExtendedEmbedding`: the pretrained rows stay in one frozen
tensor (bit-identical by construction) and only the new rows are a parameter, in fp32. So gradients, optimiser state
and weight decay touch a few vectors, never the 49,408-row tables (about 1.6 GB of AdamW state on SDXL).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Words that initialise the new tokens when nothing else is given, per concept mode.
CONCEPT_INIT_WORDS = {"face": "person", "object": "object", "style": "style"}
#: Embedding-file keys per text encoder, in the order of the pipeline's encoders (A1111/ComfyUI/kohya naming).
ENCODER_KEYS = ("clip_l", "clip_g")


class ExtendedEmbedding(nn.Module):
    """A frozen token table plus trainable rows for ids at and above its size."""

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        # Registration order matters: transformers reads a model's dtype from its first parameter.
        self.base = base
        self.base.requires_grad_(False)
        self.num_base = base.num_embeddings
        self.new = nn.Parameter(new_rows.detach().to(torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:
        """The full table (pretrained rows then new rows), for code that reads ``get_input_embeddings().weight``."""
        return torch.cat([self.base.weight, self.new.to(self.base.weight.dtype)], dim=0)

    @property
    def num_embeddings(self) -> int:
        return self.num_base + self.new.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.num_base
        out = self.base(input_ids.clamp(max=self.num_base - 1))
        new_out = F.embedding((input_ids - self.num_base).clamp(min=0), self.new).to(out.dtype)
        # torch.where instead of boolean indexing: no data-dependent shapes, no host synchronisation.
        return torch.where(is_new.unsqueeze(-1), new_out, out)


def _token_embedding_module(text_encoder) -> nn.Module:
    return text_encoder.get_input_embeddings()


def _set_token_embedding_module(text_encoder, module: nn.Module) -> None:
    text_encoder.set_input_embeddings(module)


@dataclass
class TokenInit:
    """How to initialise the new rows: exactly one of word, phrase or file."""

    word: str | None = None
    phrase: str | None = None
    file: str | None = None


class NewTokens:
    """The new tokens of all text encoders: insertion, initialisation, training state and export."""

    def __init__(self, text_encoders: list, tokenizers: list, tokens: list[str]):
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.tokens = list(tokens)
        self.token_ids: list[list[int]] = []
        self.embeddings: list[ExtendedEmbedding] = []

    # ------------------------------------------------------------------------------------------------ set-up
    @classmethod
    def insert(cls, text_encoders: list, tokenizers: list, tokens: list[str], init: TokenInit) -> NewTokens:
        """Add ``tokens`` to every tokenizer and wrap every encoder's table with initialised new rows."""
        self = cls(text_encoders, tokenizers, tokens)
        init_rows = self._initial_rows(init)
        for index, (encoder, tokenizer) in enumerate(zip(text_encoders, tokenizers, strict=True)):
            base = _token_embedding_module(encoder)
            if isinstance(base, ExtendedEmbedding):
                raise ValueError("new tokens were already inserted into this text encoder")
            if len(tokenizer) != base.num_embeddings:
                raise ValueError(
                    f"text encoder {index + 1}: the tokenizer has {len(tokenizer)} tokens but the embedding table has "
                    f"{base.num_embeddings} rows; the model's tokenizer and text encoder do not belong together"
                )
            existing = [t for t in tokens if t in tokenizer.get_vocab()]
            if existing:
                raise ValueError(
                    f"inserting_list_tokens {existing} already exist in the tokenizer's vocabulary; choose tokens that "
                    "do not, such as <s0>, <s1>"
                )
            tokenizer.add_tokens(tokens)
            ids = tokenizer.convert_tokens_to_ids(tokens)
            expected = list(range(base.num_embeddings, base.num_embeddings + len(tokens)))
            if ids != expected:
                raise ValueError(f"text encoder {index + 1}: new tokens got ids {ids}, expected {expected}")
            self.token_ids.append(ids)
            rows = init_rows[index].to(device=base.weight.device)
            extended = ExtendedEmbedding(base, rows)
            _set_token_embedding_module(encoder, extended)
            self.embeddings.append(extended)
        return self

    def _initial_rows(self, init: TokenInit) -> list[torch.Tensor]:
        n = len(self.tokens)
        if init.file:
            return load_embedding_file(Path(init.file), [e.config.hidden_size for e in self.text_encoders], n)
        rows = []
        for index, (encoder, tokenizer) in enumerate(zip(self.text_encoders, self.tokenizers, strict=True)):
            table = _token_embedding_module(encoder).weight.detach().float()
            if init.phrase is not None:
                ids = tokenizer(init.phrase, add_special_tokens=False).input_ids
                if len(ids) != n:
                    raise ValueError(
                        f"initial_phrase {init.phrase!r} has {len(ids)} tokens but n_tokens is {n}; leave n_tokens "
                        "unset to take the phrase's length, or change the phrase"
                    )
                rows.append(table[ids].clone())
            else:
                word = init.word or "person"
                ids = tokenizer(word, add_special_tokens=False).input_ids
                if len(ids) != 1:
                    raise ValueError(
                        f"initializer_token {word!r} is {len(ids)} tokens for text encoder {index + 1}; it must be a "
                        "single token (use initial_phrase for several)"
                    )
                rows.append(table[ids[0]].expand(n, -1).clone())
        return rows

    # ------------------------------------------------------------------------------------------------ training
    def parameters(self) -> list[nn.Parameter]:
        return [e.new for e in self.embeddings]

    def requires_grad_(self, flag: bool) -> None:
        for parameter in self.parameters():
            parameter.requires_grad_(flag)

    def new_token_mask(self, input_ids: torch.Tensor, encoder_index: int = 0) -> torch.Tensor:
        """Boolean mask of the positions holding new tokens."""
        return input_ids >= self.embeddings[encoder_index].num_base

    # ------------------------------------------------------------------------------------------------ state
    def rows(self) -> dict[str, torch.Tensor]:
        """The trained vectors keyed as A1111, ComfyUI and kohya expect (``clip_l``, and ``clip_g`` for SDXL)."""
        return {ENCODER_KEYS[i]: e.new.detach().float().cpu().clone() for i, e in enumerate(self.embeddings)}

    def load_rows(self, rows: dict[str, torch.Tensor]) -> None:
        for index, embedding in enumerate(self.embeddings):
            value = rows[ENCODER_KEYS[index]]
            if value.shape != embedding.new.shape:
                raise ValueError(
                    f"saved {ENCODER_KEYS[index]} embeddings have shape {tuple(value.shape)} but this run trains "
                    f"{tuple(embedding.new.shape)}: n_tokens or the base model differ from the checkpoint's"
                )
            with torch.no_grad():
                embedding.new.copy_(value.to(embedding.new.device, embedding.new.dtype))

    def pretrained_statistics(self, encoder_index: int, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and inverse covariance of the pretrained rows (for the covariance regulariser)."""
        table = self.embeddings[encoder_index].base.weight.detach().float()
        mean = table.mean(dim=0)
        centred = table - mean
        covariance = centred.T @ centred / (table.shape[0] - 1)
        covariance += ridge * covariance.diagonal().mean() * torch.eye(covariance.shape[0], device=table.device)
        return mean, torch.linalg.inv(covariance)


def load_embedding_file(path: Path, widths: list[int], n_tokens: int) -> list[torch.Tensor]:
    """Read an embedding file in any of the common layouts, one tensor of ``n_tokens`` rows per encoder."""
    if not path.is_file():
        raise ValueError(f"initial_embedding_file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in data:  # A1111 .pt
        data = {"clip_l": next(iter(data["string_to_param"].values()))}
    elif "emb_params" in data:  # kohya SD1.5
        data = {"clip_l": data["emb_params"]}
    elif not any(key in data for key in ENCODER_KEYS) and len(data) == 1:  # diffusers {token: tensor}
        data = {"clip_l": next(iter(data.values()))}
    rows = []
    for index, width in enumerate(widths):
        key = ENCODER_KEYS[index]
        if key not in data:
            raise ValueError(f"initial_embedding_file {path.name} has no {key!r} vectors (keys: {sorted(data)})")
        value = data[key].float()
        value = value.unsqueeze(0) if value.dim() == 1 else value
        if tuple(value.shape) != (n_tokens, width):
            raise ValueError(
                f"initial_embedding_file {path.name}: {key} has shape {tuple(value.shape)}, expected "
                f"({n_tokens}, {width}) for n_tokens={n_tokens}"
            )
        rows.append(value)
    return rows
