"""Prompt encoding for SD1.5 and SDXL, with tokenisation done once and an output cache for frozen text sides.

SD1.5 conditions on CLIP-L's last hidden state. SDXL concatenates the penultimate hidden states of CLIP-L and CLIP-G
and adds CLIP-G's pooled projection to the time embedding (as diffusers' SDXL pipeline and training scripts do).
"""

from __future__ import annotations

import torch


class PromptEncoder:
    def __init__(self, text_encoders: list, tokenizers: list, is_sdxl: bool, device: torch.device):
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.is_sdxl = is_sdxl
        self.device = device
        self._ids: dict[str, list[torch.Tensor]] = {}
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    # ------------------------------------------------------------------------------------------ tokenisation
    def token_ids(self, texts: list[str]) -> list[torch.Tensor]:
        """[B, 77] ids per tokenizer; each distinct text is tokenised once per run."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._ids]
        if missing:
            per_tokenizer = [
                tok(missing, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(self.device)
                for tok in self.tokenizers
            ]
            for row, text in enumerate(missing):
                self._ids[text] = [ids[row] for ids in per_tokenizer]
        return [torch.stack([self._ids[t][k] for t in texts]) for k in range(len(self.tokenizers))]

    # ------------------------------------------------------------------------------------------------ encoding
    def encode_ids(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds [B, 77, D], pooled [B, D2] or None for SD1.5)."""
        if not self.is_sdxl:
            return self.text_encoders[0](ids[0], output_hidden_states=False)[0], None
        hidden = []
        pooled = None
        for encoder, token_ids in zip(self.text_encoders, ids, strict=True):
            output = encoder(token_ids, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # CLIP-G's projected pooled output (text_embeds); the last encoder is CLIP-G
        return torch.cat(hidden, dim=-1), pooled

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._cache is not None:
            embeds = [self._cache[t] for t in texts]
            prompt = torch.stack([e[0] for e in embeds])
            pooled = torch.stack([e[1] for e in embeds]) if self.is_sdxl else None
            return prompt, pooled
        distinct = list(dict.fromkeys(texts))
        if len(distinct) == len(texts):
            return self.encode_ids(self.token_ids(texts))
        # A batch often repeats a caption (one concept, few images): each distinct caption runs through the text
        # encoders once and its rows are gathered; the gather's backward sums the repeats' gradients.
        prompt, pooled = self.encode_ids(self.token_ids(distinct))
        index = torch.tensor([distinct.index(t) for t in texts], device=prompt.device)
        return prompt.index_select(0, index), pooled.index_select(0, index) if pooled is not None else None

    # ------------------------------------------------------------------------------------------------ cache
    @property
    def cached(self) -> bool:
        return self._cache is not None

    @torch.no_grad()
    def build_cache(self, texts: list[str], autocast, batch_size: int = 16) -> None:
        """Encode every distinct text once; from now on :meth:`encode` only gathers."""
        unique = list(dict.fromkeys(texts))
        cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for start in range(0, len(unique), batch_size):
            chunk = unique[start : start + batch_size]
            with autocast():
                prompt, pooled = self.encode_ids(self.token_ids(chunk))
            for row, text in enumerate(chunk):
                cache[text] = (prompt[row].detach(), pooled[row].detach() if pooled is not None else None)
        self._cache = cache
