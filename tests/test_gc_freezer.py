"""The survivors of a slow full garbage collection are frozen (`engine.gc_freezer`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engine.gc_freezer import FullCollectionFreezer

ROOT = Path(__file__).resolve().parent.parent


class FakeCollector:
    def __init__(self) -> None:
        self.now = 0.0
        self.frozen = 0
        self.freezes = 0

    def freeze(self) -> None:
        self.freezes += 1
        self.frozen += 1000

    def collect(self, freezer: FullCollectionFreezer, generation: int, seconds: float) -> None:
        freezer.on_collection("start", {"generation": generation})
        self.now += seconds
        freezer.on_collection("stop", {"generation": generation, "collected": 0, "uncollectable": 0})


def make() -> tuple[FakeCollector, FullCollectionFreezer]:
    fake = FakeCollector()
    freezer = FullCollectionFreezer(0.05, freeze=fake.freeze, frozen_count=lambda: fake.frozen, clock=lambda: fake.now)
    return fake, freezer


def test_only_a_slow_full_collection_leads_to_a_freeze():
    fake, freezer = make()
    fake.collect(freezer, 0, 0.2)  # young generations: never, however long
    fake.collect(freezer, 1, 0.2)
    fake.collect(freezer, 2, 0.01)  # a quick full collection: nothing to gain
    assert freezer.freeze_if_wanted() is False and fake.freezes == 0
    fake.collect(freezer, 2, 0.3)
    assert fake.freezes == 0  # never inside the collector's callback
    assert freezer.freeze_if_wanted() is True
    assert (fake.freezes, freezer.freezes, freezer.frozen_objects) == (1, 1, 1000)
    assert freezer.freeze_if_wanted() is False  # once per slow collection


def test_several_slow_collections_between_checks_freeze_once():
    fake, freezer = make()
    fake.collect(freezer, 2, 0.3)
    fake.collect(freezer, 2, 0.4)
    assert freezer.freeze_if_wanted() is True and freezer.freeze_if_wanted() is False
    assert fake.freezes == 1


def test_in_a_real_interpreter_a_slow_full_collection_freezes_its_survivors():
    # In a child interpreter: freezing the test runner's own objects would outlive this test.
    script = """
import gc, logging
from engine.gc_freezer import FullCollectionFreezer
logging.basicConfig(level=logging.INFO)
class Box:
    __slots__ = ("value",)
    def __init__(self, value): self.value = value
kept = [Box(n) for n in range(300_000)]  # tracked, as the state's Stock objects are
freezer = FullCollectionFreezer(0.0)
gc.callbacks.append(freezer.on_collection)
assert gc.get_freeze_count() == 0
gc.collect()
assert freezer.freeze_if_wanted()
frozen = gc.get_freeze_count()
assert frozen >= 300_000, frozen
assert len(gc.get_objects(generation=2)) < 1000  # the next full collection has almost nothing to scan
print("frozen", frozen)
"""
    finished = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert "froze its" in finished.stderr and "frozen" in finished.stdout
