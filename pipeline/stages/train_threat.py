"""What of the conditions params training uses, written as the file the `train` stage depends on.

`train.threat` may name a triggering condition; training then uses that condition's kind and range
and `conditions.search` (its validation worst case), and nothing else of the conditions section: not
the other conditions, not a rationale, not the smoothing settings. DVC cannot take a params dep from
a param's value, so this stage (no data, no model: a second) writes exactly that, and `train`
depends on the file: editing another condition re-runs this stage, which writes the same bytes, and
DVC skips training, which for a real model takes hours.
"""
from __future__ import annotations

from pipeline.config import LP_THREAT
from pipeline.io import write_json
from pipeline.workspace import Workspace

NOT_FOR_TRAINING = {"rationale", "smoothing"}  # condition settings that do not shape training


def training_threat(params) -> dict:
    """The threat `train.threat` names, as training uses it (see the module docstring)."""
    name = getattr(params.train, "threat", LP_THREAT)
    if name == LP_THREAT or name not in params.conditions.threats:
        return {"threat": name}  # the Lp ball lives in `threat`, a params dep of train itself
    condition = params.conditions.threats[name].model_dump(mode="json", exclude=NOT_FOR_TRAINING)
    return {"threat": name, "condition": condition, "search": params.conditions.search.model_dump(mode="json")}


def main(ws: Workspace) -> int:
    record = training_threat(ws.params())
    write_json(ws.root / "artifacts" / "train_threat.json", record)
    print(f"train_threat: train.threat = {record['threat']!r}"
          + (f" ({record['condition']['kind']})" if "condition" in record else " (the threat section's Lp ball)"))
    return 0
