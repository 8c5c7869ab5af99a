"""The recommendation: which checkpoint, at which LoRA scale, to use.

The rule (also written into every report):

1. Every (checkpoint, LoRA scale) pair is a candidate.
2. Each quality score — likeness, adherence and, when aesthetic weights were given, aesthetic — is normalised
   across the candidates: ``(x - min) / max(max - min, floor)``. The floor (0.01 for the CLIP similarities, 0.1
   for the aesthetic score) keeps a spread that is only noise from being stretched to the full range: below it,
   a score counts in proportion to its raw differences.
3. The combined score is the weighted mean of the normalised scores: likeness 1, adherence 1, aesthetic 0.5.
   Training trades likeness (rises) against adherence (falls); the best candidate sits at the knee.
4. Diversity collapse gate: a candidate whose diversity is below ``collapse_ratio`` (0.5) of the reference
   diversity has collapsed (it draws the same picture whatever the prompt) and is not recommended. The reference
   is the base model's diversity on the same prompts without the token when the baseline was rendered, else the
   highest diversity among the candidates.
5. The candidate with the highest combined score among those that did not collapse is recommended; ties go to the
   earlier step (less trained, less overfit), then to the scale closer to 1. When every candidate collapsed, the
   highest combined score is recommended anyway and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

QUALITY_SCORES = ("likeness", "adherence", "aesthetic")


@dataclass(frozen=True)
class RuleParams:
    weights: dict[str, float] = field(
        default_factory=lambda: {"likeness": 1.0, "adherence": 1.0, "aesthetic": 0.5})
    floors: dict[str, float] = field(
        default_factory=lambda: {"likeness": 0.01, "adherence": 0.01, "aesthetic": 0.1})
    collapse_ratio: float = 0.5

    def to_dict(self) -> dict:
        return {"weights": dict(self.weights), "floors": dict(self.floors), "collapse_ratio": self.collapse_ratio}


_RULE_MARK = "The rule (also written into every report):"
#: The rule as one paragraph, for the report: taken from this module's docstring so the two cannot drift.
RULE_TEXT = (" ".join(__doc__.split(_RULE_MARK, 1)[1].split()) if __doc__ and _RULE_MARK in __doc__
             else "see the docstring of trainer/evaluate/recommend.py")


@dataclass(frozen=True)
class Candidate:
    step: int
    lora_scale: float
    scores: dict[str, float | None]
    """adherence, likeness, diversity (required) and aesthetic (None without weights)."""

    @property
    def label(self) -> str:
        return f"checkpoint-{self.step} at LoRA scale {self.lora_scale:g}"


@dataclass(frozen=True)
class Ranked:
    candidate: Candidate
    normalised: dict[str, float]
    combined: float
    diversity_ratio: float
    collapsed: bool


@dataclass(frozen=True)
class Recommendation:
    best: Ranked
    ranked: list[Ranked]
    """Every candidate, in the order given."""
    used_scores: tuple[str, ...]
    reference_diversity: float
    reference: str
    """What the reference diversity is: ``base model`` or ``most diverse candidate``."""
    all_collapsed: bool
    reason: str


def recommend(candidates: list[Candidate], reference_diversity: float | None = None,
              params: RuleParams | None = None) -> Recommendation:
    """Apply the rule of this module's docstring."""
    params = params or RuleParams()
    if not candidates:
        raise ValueError("no candidates to choose from")
    for candidate in candidates:
        for name in ("likeness", "adherence", "diversity"):
            value = candidate.scores.get(name)
            if value is None or not math.isfinite(value):
                raise ValueError(f"{candidate.label} has no finite {name} score ({value})")
    used = tuple(name for name in QUALITY_SCORES
                 if all(c.scores.get(name) is not None and math.isfinite(c.scores[name]) for c in candidates))

    normalised: list[dict[str, float]] = [{} for _ in candidates]
    for name in used:
        values = [c.scores[name] for c in candidates]
        low, spread = min(values), max(max(values) - min(values), params.floors[name])
        for row, value in zip(normalised, values, strict=True):
            row[name] = (value - low) / spread
    total_weight = sum(params.weights[name] for name in used)

    if reference_diversity is None:
        reference_diversity, reference = max(c.scores["diversity"] for c in candidates), "most diverse candidate"
    else:
        reference = "base model"
    ranked = []
    for candidate, row in zip(candidates, normalised, strict=True):
        combined = sum(params.weights[name] * row[name] for name in used) / total_weight
        ratio = candidate.scores["diversity"] / reference_diversity if reference_diversity > 0 else 1.0
        ranked.append(Ranked(candidate, row, combined, ratio, collapsed=ratio < params.collapse_ratio))

    eligible = [r for r in ranked if not r.collapsed]
    all_collapsed = not eligible
    best = min(eligible or ranked, key=lambda r: (-round(r.combined, 12), r.candidate.step,
                                                  abs(r.candidate.lora_scale - 1.0), r.candidate.lora_scale))
    reason = _reason(best, ranked, used, reference_diversity, reference, all_collapsed, params)
    return Recommendation(best, ranked, used, reference_diversity, reference, all_collapsed, reason)


def _reason(best: Ranked, ranked: list[Ranked], used: tuple[str, ...], reference_diversity: float, reference: str,
            all_collapsed: bool, params: RuleParams) -> str:
    scores = best.candidate.scores
    parts = [f"{name} {scores[name]:.3f}" for name in used]
    collapsed = [r for r in ranked if r.collapsed]
    among = " among those whose outputs did not collapse" if collapsed and not all_collapsed else ""
    text = (f"{best.candidate.label} has the highest combined score{among} ({best.combined:.2f} of 1; "
            f"{', '.join(parts)}) with diversity {scores['diversity']:.3f}, "
            f"{best.diversity_ratio:.0%} of the {reference}'s {reference_diversity:.3f}")
    if len(ranked) == 1:
        text = f"{best.candidate.label} is the only candidate ({', '.join(parts)}; diversity {scores['diversity']:.3f})"
    if all_collapsed:
        text += (f". Every candidate's diversity is below {params.collapse_ratio:.0%} of the {reference}'s: the "
                 "outputs collapsed at every checkpoint and scale, so the LoRA looks overfit throughout; try an "
                 "earlier checkpoint, a lower LoRA scale or fewer training steps")
    elif collapsed:
        names = "; ".join(f"{r.candidate.label} ({r.diversity_ratio:.0%})" for r in collapsed)
        text += f". Not considered because their outputs collapsed (diversity below " \
                f"{params.collapse_ratio:.0%} of the {reference}'s): {names}"
    runner_up = sorted((r for r in ranked if r is not best and (all_collapsed or not r.collapsed)),
                       key=lambda r: -r.combined)
    if runner_up:
        text += f". Next best: {runner_up[0].candidate.label} ({runner_up[0].combined:.2f})"
    return text + "."
