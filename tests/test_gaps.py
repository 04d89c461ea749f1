"""How a stage notices the messages Faust never delivered (agents/gaps.py), without Kafka."""

from laggard.agents.gaps import StallWatch


def test_a_stage_standing_still_is_stalled_after_the_wait_and_again_only_after_another():
    watch = StallWatch(after_s=10.0)
    key = ("samples", 3)
    assert not watch.stalled(key, 120, now=0.0)  # first sight: counting starts
    assert not watch.stalled(key, 120, now=9.9)
    assert watch.stalled(key, 120, now=10.0)
    # Once reported, it waits a whole period again: a seek back gets time to work.
    assert not watch.stalled(key, 120, now=15.0)
    assert watch.stalled(key, 120, now=20.0)


def test_a_stage_that_moves_or_another_stage_starts_counting_again():
    watch = StallWatch(after_s=10.0)
    assert not watch.stalled("a", 120, now=0.0)
    assert not watch.stalled("a", 121, now=9.0)  # it took a message
    assert not watch.stalled("a", 121, now=18.0)
    assert watch.stalled("a", 121, now=19.0)
    assert not watch.stalled("b", None, now=19.0)  # each key on its own; no stage yet counts too
    assert watch.stalled("b", None, now=29.0)


def test_forget_starts_every_count_again():
    watch = StallWatch(after_s=10.0)
    watch.stalled("a", 5, now=0.0)
    watch.forget()  # e.g. a rebalance: nothing moved, nothing was stuck
    assert not watch.stalled("a", 5, now=10.0)
    assert watch.stalled("a", 5, now=20.0)
