"""The recommendation follows the documented rule: score tables where the right answer is known."""

from __future__ import annotations

import pytest

from trainer.evaluate import recommend as rule_module
from trainer.evaluate.recommend import RULE_TEXT, Candidate, RuleParams, recommend


def _c(step, scale=1.0, *, likeness, adherence, diversity=0.4, aesthetic=None):
    return Candidate(step, scale, {"likeness": likeness, "adherence": adherence, "diversity": diversity,
                                   "aesthetic": aesthetic})


def _best(result):
    return result.best.candidate.step, result.best.candidate.lora_scale


def test_the_knee_between_likeness_and_adherence_wins():
    # Training raises likeness and lowers adherence; the middle checkpoint keeps most of both.
    table = [
        _c(100, likeness=0.60, adherence=0.32),
        _c(200, likeness=0.75, adherence=0.30),
        _c(300, likeness=0.78, adherence=0.24),
    ]
    result = recommend(table)
    assert _best(result) == (200, 1.0)
    # Normalised exactly as documented: (x - min) / max(max - min, 0.01), then the weighted mean.
    middle = result.ranked[1]
    assert middle.normalised == pytest.approx({"likeness": 0.15 / 0.18, "adherence": 0.06 / 0.08})
    assert middle.combined == pytest.approx((0.15 / 0.18 + 0.06 / 0.08) / 2)
    assert result.used_scores == ("likeness", "adherence")
    assert "checkpoint-200 at LoRA scale 1 has the highest combined score" in result.reason


def test_a_collapsed_candidate_is_not_recommended_even_with_the_best_scores():
    table = [
        _c(100, likeness=0.70, adherence=0.30, diversity=0.40),
        _c(200, likeness=0.80, adherence=0.31, diversity=0.16),  # best on paper, but draws the same picture
    ]
    result = recommend(table, reference_diversity=0.40)
    assert _best(result) == (100, 1.0)
    assert [r.collapsed for r in result.ranked] == [False, True]
    assert result.ranked[1].diversity_ratio == pytest.approx(0.4)
    assert result.reference == "base model" and not result.all_collapsed
    assert "Not considered because their outputs collapsed" in result.reason
    assert "checkpoint-200 at LoRA scale 1 (40%)" in result.reason
    assert result.reason.startswith("checkpoint-100 at LoRA scale 1 has the highest combined score among those whose "
                                    "outputs did not collapse")

    # Just above the gate it is eligible, and wins.
    table[1] = _c(200, likeness=0.80, adherence=0.31, diversity=0.21)
    assert _best(recommend(table, reference_diversity=0.40)) == (200, 1.0)


def test_without_a_baseline_the_most_diverse_candidate_is_the_reference():
    table = [
        _c(100, likeness=0.70, adherence=0.30, diversity=0.40),
        _c(200, likeness=0.80, adherence=0.31, diversity=0.19),
    ]
    result = recommend(table)
    assert result.reference == "most diverse candidate" and result.reference_diversity == pytest.approx(0.40)
    assert _best(result) == (100, 1.0)


def test_when_every_candidate_collapsed_the_best_combined_is_named_with_a_warning():
    table = [
        _c(100, likeness=0.70, adherence=0.30, diversity=0.10),
        _c(200, likeness=0.80, adherence=0.31, diversity=0.05),
    ]
    result = recommend(table, reference_diversity=0.40)
    assert result.all_collapsed and _best(result) == (200, 1.0)
    assert "collapsed at every checkpoint and scale" in result.reason


def test_the_floor_keeps_noise_from_deciding():
    # Adherence differs by 0.001 (noise), likeness by 0.02 (real): plain min-max would make this a tie at 0.5.
    table = [
        _c(100, likeness=0.70, adherence=0.300),
        _c(200, likeness=0.72, adherence=0.299),
    ]
    result = recommend(table)
    assert _best(result) == (200, 1.0)
    assert result.ranked[0].normalised["adherence"] == pytest.approx(0.1)
    assert result.ranked[1].combined == pytest.approx(0.5)


def test_aesthetic_counts_at_half_weight_and_only_when_every_candidate_has_it():
    table = [
        _c(100, likeness=0.70, adherence=0.30, aesthetic=5.0),
        _c(200, likeness=0.70, adherence=0.30, aesthetic=6.0),
    ]
    result = recommend(table)
    assert result.used_scores == ("likeness", "adherence", "aesthetic")
    assert _best(result) == (200, 1.0) and result.ranked[1].combined == pytest.approx(0.5 / 2.5)
    # Likeness up by the full range outweighs aesthetic down by the full range (weight 1 vs 0.5).
    table = [
        _c(100, likeness=0.70, adherence=0.30, aesthetic=6.0),
        _c(200, likeness=0.75, adherence=0.30, aesthetic=5.0),
    ]
    assert _best(recommend(table)) == (200, 1.0)
    table[0] = _c(100, likeness=0.70, adherence=0.30, aesthetic=None)
    assert recommend(table).used_scores == ("likeness", "adherence")


def test_ties_go_to_the_earlier_step_then_the_scale_nearer_one():
    same = {"likeness": 0.7, "adherence": 0.3}
    result = recommend([_c(300, 1.0, **same), _c(200, 0.6, **same), _c(200, 1.2, **same), _c(200, 0.9, **same)])
    assert _best(result) == (200, 0.9)


def test_scales_are_candidates_of_their_own():
    table = [
        _c(100, 0.8, likeness=0.70, adherence=0.30),
        _c(100, 1.0, likeness=0.76, adherence=0.29),
        _c(200, 0.8, likeness=0.77, adherence=0.29),
        _c(200, 1.0, likeness=0.80, adherence=0.22),
    ]
    assert _best(recommend(table)) == (200, 0.8)


def test_single_candidate_and_bad_input():
    result = recommend([_c(50, likeness=0.7, adherence=0.3)])
    assert _best(result) == (50, 1.0) and "only candidate" in result.reason
    with pytest.raises(ValueError, match="no candidates"):
        recommend([])
    with pytest.raises(ValueError, match="no finite likeness"):
        recommend([_c(50, likeness=float("nan"), adherence=0.3)])


def test_the_rule_in_the_report_is_the_documented_one():
    params = RuleParams()
    assert " ".join(rule_module.__doc__.split()).endswith(RULE_TEXT)
    for text in ("likeness 1, adherence 1, aesthetic 0.5", f"({params.collapse_ratio})", "0.01", "0.1"):
        assert text in RULE_TEXT
    assert params.weights == {"likeness": 1.0, "adherence": 1.0, "aesthetic": 0.5}
    assert params.floors == {"likeness": 0.01, "adherence": 0.01, "aesthetic": 0.1}
