"""Which model versions are live: deployed ones (in Redis) over the configured ones."""

from __future__ import annotations

from common.config import Config, Model
from provisioner.state import State


def live_models(state: State, cfg: Config) -> list[Model]:
    models = state.models()
    if not models:
        return list(cfg.models)
    return [Model(m.name, m.version, m.semitones) for m in models]


def live_model(state: State, cfg: Config, name: str) -> Model | None:
    m = state.model(name)
    if m is not None:
        return Model(m.name, m.version, m.semitones)
    return cfg.model(name)
