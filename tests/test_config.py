"""Config rules that refuse settings which cannot mean anything."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from capray.config import load_config


def test_averaging_score_draws_needs_fresh_draws():
    assert load_config(overrides={"cap": {"score_draw": "fresh", "score_draws": 3}}).cap.score_draws == 3
    assert load_config(overrides={"cap": {"score_draw": "gradient"}}).cap.score_draws == 1
    with pytest.raises(ValidationError, match="only the gradient's one draw"):
        load_config(overrides={"cap": {"score_draw": "gradient", "score_draws": 2}})


def test_alpha_may_not_exceed_eps():
    with pytest.raises(ValidationError, match="alpha"):
        load_config(overrides={"attack": {"eps": 0.01, "alpha": 0.02}})
