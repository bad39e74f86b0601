"""`dispatcher run` collects young garbage less often and freezes what it loaded."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from dispatcher.cli.commands import tune_garbage_collector
from dispatcher.core.config import load_settings
from dispatcher.core.errors import ConfigError


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_the_youngest_generation_waits_for_the_threshold_and_the_loaded_heap_is_frozen(
    restored_gc: None,
) -> None:
    _, middle, oldest = gc.get_threshold()
    loaded = [object() for _ in range(10)]  # alive at start, like the app's modules
    gc.unfreeze()
    tune_garbage_collector(50_000)
    assert gc.get_threshold() == (50_000, middle, oldest)
    assert gc.get_freeze_count() > len(loaded)


def test_the_threshold_defaults_to_50000_and_refuses_nonsense() -> None:
    settings, _ = load_settings(env={})
    assert settings.gc_threshold == 50_000
    settings, _ = load_settings(env={"DISPATCHER_GC_THRESHOLD": "700"})
    assert settings.gc_threshold == 700
    with pytest.raises(ConfigError, match="GC_THRESHOLD"):
        load_settings(env={"DISPATCHER_GC_THRESHOLD": "0"})
