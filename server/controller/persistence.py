"""The controller's state file (DEEBERT_CONTROLLER_STATE): written atomically, read back only when it is for the
same model and exit criterion. A missing, unreadable or foreign file is ignored with a warning, never a failed
start."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.controller.evidence import LadderEvidence

logger = logging.getLogger("deebert.controller")

STATE_VERSION = 1


@dataclass(frozen=True)
class SavedState:
    """What a restarted server resumes: the agreement's threshold, the latency push and the evidence window."""

    threshold: float
    latency_rungs: int
    evidence: list[LadderEvidence]
    same_ladder: bool  # False: the ladder changed since, so the evidence (per rung) was dropped


def state_document(
    model: str,
    criterion: str,
    ladder: Sequence[float],
    threshold: float,
    latency_rungs: int,
    agrees: list[list[bool]],
    exit_layers: list[list[int]],
) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "model": model,
        "criterion": criterion,
        "ladder": list(ladder),
        "threshold": threshold,
        "latency_rungs": latency_rungs,
        "evidence": {"agrees": agrees, "exit_layers": exit_layers},
        "saved_at": time.time(),
    }


def write_state(path: Path, document: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document))
    os.replace(partial, path)


def read_state(path: Path, model: str, criterion: str, ladder: Sequence[float]) -> SavedState | None:
    """The saved state if it is for this model and criterion; None (with the reason logged) otherwise."""
    if not path.exists():
        logger.info("controller state %s does not exist yet; starting at the configured default", path)
        return None
    try:
        saved = json.loads(path.read_text())
        if saved.get("version") != STATE_VERSION:
            raise ValueError(f"state version {saved.get('version')}, expected {STATE_VERSION}")
        if saved["model"] != model or saved["criterion"] != criterion:
            raise ValueError(f"it is for {saved['model']} ({saved['criterion']}), not {model} ({criterion})")
        threshold = float(saved["threshold"])
        same_ladder = [round(v, 9) for v in saved["ladder"]] == [round(v, 9) for v in ladder]
        evidence = saved["evidence"] if same_ladder else {"agrees": [], "exit_layers": []}
        rows = [
            LadderEvidence(tuple(bool(a) for a in agrees), tuple(int(x) for x in layers))
            for agrees, layers in zip(evidence["agrees"], evidence["exit_layers"], strict=True)
        ]
        push = int(saved.get("latency_rungs", 0))
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("controller state %s ignored: %s", path, err)
        return None
    if not same_ladder:
        logger.warning("controller state %s: the ladder changed; its threshold kept, its evidence dropped", path)
    return SavedState(threshold, push, rows, same_ladder)
