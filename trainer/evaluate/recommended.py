"""The LoRA scale a zip's checkpoint evaluation recommends for the weights the zip delivers.

``evaluate_checkpoints`` puts ``evaluation/report.json`` into the zip. Its recommendation names a checkpoint and a
scale; the zip holds the final checkpoint. When the two are the same checkpoint its scale is used; otherwise the
report's own ranking of the final checkpoint's rows decides (the highest combined score among the scales whose
outputs did not collapse; ties to the scale nearer 1, then the lower). A zip is untrusted input: a report that is
missing, too large, malformed or outside the predictor's ``lora_scale`` bounds gives no recommendation (and a
warning), never an error.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

#: Where an evaluation's report lies in a run folder and in the zip (the runner writes it there).
EVALUATION_DIR = "evaluation"
REPORT_NAME = "report.json"
#: A report lists a few rows per checkpoint and scale: far below this.
MAX_REPORT_BYTES = 16 << 20
SCALE_BOUNDS = (0.0, 2.0)


def recommended_scale(folder: Path, delivered_step: int | None) -> float | None:
    path = Path(folder) / EVALUATION_DIR / REPORT_NAME
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            raise ValueError(f"over {MAX_REPORT_BYTES >> 20} MiB")
        report = json.loads(path.read_text(encoding="utf-8"))
        scale = _scale_for(report, delivered_step)
    except RecursionError:
        # A hostile zip's report nested thousands deep: json gives no JSONDecodeError for that.
        logger.warning("ignoring the evaluation report in %s (nested too deeply to read)", Path(folder).name)
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        logger.warning("ignoring the evaluation report in %s (%s)", Path(folder).name, error)
        return None
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or not (
            SCALE_BOUNDS[0] <= scale <= SCALE_BOUNDS[1]):
        logger.warning("ignoring the evaluation report's LoRA scale %r: not a number in %s", scale, SCALE_BOUNDS)
        return None
    return float(scale)


def _scale_for(report: dict, delivered_step: int | None):
    recommendation = report["recommendation"]
    if delivered_step is None or recommendation.get("step") == delivered_step:
        return recommendation["lora_scale"]
    rows = [row for row in report.get("results") or [] if row.get("step") == delivered_step]
    if not rows:
        logger.info("the evaluation report has no rows for the delivered checkpoint (step %s)", delivered_step)
        return None
    usable = [row for row in rows if not row.get("collapsed")] or rows
    # The recommendation's own tie-break: the scale nearer 1, then the lower one.
    best = min(usable, key=lambda row: (-float(row.get("combined") or 0.0), abs(float(row["lora_scale"]) - 1.0),
                                        float(row["lora_scale"])))
    return best["lora_scale"]
