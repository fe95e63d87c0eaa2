"""Models: the live version of each, and the versions draining."""

from __future__ import annotations

import json
from collections.abc import Iterable

from provisioner.state.base import StateBase
from provisioner.state.keys import MODELS
from provisioner.state.records import LiveModel, _live_model


class Models(StateBase):
    """State's verbs on models (a mixin)."""

    def seed_models(self, models: Iterable[tuple[str, str, float]]) -> None:
        """Config models become live unless a deploy already set them (first run wins)."""
        for name, version, semitones in models:
            entry = {"live": {"version": version, "semitones": semitones}, "draining": []}
            self.r.hsetnx(MODELS, name, json.dumps(entry))

    def deploy(self, model: str, version: str, semitones: float, deadline: float) -> LiveModel:
        raw = self._deploy(keys=[MODELS], args=[model, version, semitones, deadline])
        return _live_model(model, raw)

    def models(self) -> list[LiveModel]:
        return [_live_model(name, raw) for name, raw in sorted(self.r.hgetall(MODELS).items())]

    def model(self, name: str) -> LiveModel | None:
        raw = self.r.hget(MODELS, name)
        return _live_model(name, raw) if raw else None
