"""What a build runs: the stages it reports, and a bad metric refused before any work."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from boomerang_core.build import STAGE_MINUTES, BuildStatus, build_family, build_stages
from boomerang_core.distill import DistillConfig
from boomerang_core.errors import BoomerangError


def test_the_synth_stage_runs_only_when_the_build_needs_the_teachers_conversations() -> None:
    corpus_only = DistillConfig()
    assert build_stages(corpus_only) == ("distill", "order", "search")
    assert build_stages(corpus_only, interim=True) == ("interim", "distill", "order", "search")
    with_chat = replace(corpus_only, chat_fraction=0.5)
    assert build_stages(with_chat, interim=True) == ("interim", "synth", "distill", "order", "search")
    assert build_stages(corpus_only, metric="chat_kl") == ("synth", "distill", "order", "search")


def test_the_eta_counts_the_synth_stage(tmp_path: Path) -> None:
    with_synth = BuildStatus(tmp_path / "a.json", build_stages(DistillConfig(chat_fraction=0.5)))
    without = BuildStatus(tmp_path / "b.json", build_stages(DistillConfig()))
    assert with_synth.state["stage"] == "synth" and without.state["stage"] == "distill"
    eta_with, eta_without = with_synth.eta_s(), without.eta_s()
    assert eta_with is not None and eta_without is not None and eta_with > eta_without


def test_an_unknown_metric_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(BoomerangError, match="unknown search metric 'bleu'"):
        build_family(tmp_path / "no-teacher", tmp_path / "student", DistillConfig(), name="x", metric="bleu")
    assert not (tmp_path / "student").exists()


def test_time_in_a_stage_before_its_first_progress_does_not_inflate_the_eta() -> None:
    """The interim stage took its figure; two minutes into synth with no progress yet, the ETA is what
    is left of synth and distill at their figures (the first start once showed 102 minutes here)."""
    status = BuildStatus(None, ("interim", "synth", "distill"))
    status.stage("synth")
    status.done_seconds = {"interim": STAGE_MINUTES["interim"] * 60}
    status.stage_started -= 120
    eta = status.eta_s()
    expected = (STAGE_MINUTES["synth"] + STAGE_MINUTES["distill"]) * 60 - 120
    assert eta is not None and eta == pytest.approx(expected, abs=5)
