"""Model versions as pure functions (provisioner/versions.py): push, canary share, promote,
rollback, redeploy, and the automatic rollback rule. No I/O."""

from __future__ import annotations

import pytest

from provisioner import versions
from provisioner.versions import Entry, Health, VersionState


def pushed(*digests: str, canary: int | None = None, now: float = 100.0) -> Entry:
    entry: Entry | None = None
    for i, d in enumerate(digests):
        entry, _ = versions.push(entry, "miku", d, 4, "", now,
                                 drain_s=600, canary_percent=canary if i else None)
    assert entry is not None
    return entry


def test_push_makes_the_next_version_live_and_the_old_one_drains() -> None:
    e = pushed("a", "b")
    assert (e.live, e.canary) == ("2", "")
    assert e.state("2", 100) is VersionState.LIVE
    assert e.state("1", 100) is VersionState.DRAINING and e.versions["1"].deadline == 700
    assert e.state("1", 701) is VersionState.RETIRED
    assert [v.version for v in e.serving()] == ["2"]


def test_pushing_the_same_package_again_registers_nothing() -> None:
    e = pushed("a")
    again, v = versions.push(e, "miku", "a", 4, "", 200, 600)
    assert again == e and v.version == "1"


def test_canary_takes_exactly_its_share_spread_evenly() -> None:
    e = pushed("a", "b", canary=25)
    assert (e.live, e.canary, e.canary_percent) == ("1", "2", 25)
    got = [e.for_new_session(n).version for n in range(1, 41)]
    assert got.count("2") == 10 and "2" in got[:4] and "2" in got[-4:]
    assert [v.version for v in e.serving()] == ["1", "2"]


@pytest.mark.parametrize("percent", [1, 10, 33, 50, 90, 99])
def test_canary_share_is_within_one_session_of_asked(percent: int) -> None:
    e = pushed("a", "b", canary=percent)
    seen = sum(e.for_new_session(n).version == "2" for n in range(1, 201))
    assert abs(seen - 2 * percent) <= 1


def test_promote_and_rollback_of_a_canary() -> None:
    e = pushed("a", "b", canary=10)
    promoted = versions.promote(e, 200, 600)
    assert (promoted.live, promoted.canary) == ("2", "")
    assert promoted.state("1", 200) is VersionState.DRAINING
    back = versions.rollback(e, 200, 600)
    assert (back.live, back.canary) == ("1", "")
    assert back.state("2", 200) is VersionState.DRAINING and not back.versions["2"].failed
    with pytest.raises(ValueError, match="no canary"):
        versions.promote(back, 300, 600)


def test_rollback_without_a_canary_returns_to_the_version_live_before() -> None:
    e = pushed("a", "b", "c")
    back = versions.rollback(e, 200, 600)
    assert back.live == "2" and back.versions["2"].deadline is None
    assert back.state("3", 200) is VersionState.DRAINING
    with pytest.raises(ValueError, match="no earlier good version"):
        versions.rollback(pushed("a"), 200, 600)


def test_a_failed_version_drains_at_once_and_is_skipped_by_later_rollbacks() -> None:
    e = versions.rollback(pushed("a", "b", canary=50), 200, 600, failed="3 of 4 failed")
    assert e.state("2", 200) is VersionState.FAILED and e.versions["2"].deadline == 200
    assert e.for_new_session(1).version == "1"
    e = pushed("a", "b", "c")
    e = versions.rollback(e, 200, 600, failed="broken")          # 3 failed: back to 2
    assert e.live == "2"
    e, _ = versions.push(e, "miku", "d", 4, "", 300, 600)          # 4 live
    assert versions.rollback(e, 400, 600).live == "2"              # skips failed 3


def test_resume_stays_on_its_version_unless_it_no_longer_serves() -> None:
    e = pushed("a", "b", canary=50)
    assert e.for_resume("2", 1).version == "2" and e.for_resume("1", 2).version == "1"
    failed = versions.rollback(e, 200, 600, failed="x")
    assert failed.for_resume("2", 1).version == "1"


def test_deploy_makes_a_pushed_version_live_again_and_clears_its_failure() -> None:
    e = versions.rollback(pushed("a", "b"), 200, 600, failed="x")
    again = versions.deploy(e, "2", 300, 600)
    assert again.live == "2" and not again.versions["2"].failed
    with pytest.raises(ValueError, match="no version '7'"):
        versions.deploy(e, "7", 300, 600)


def test_entry_survives_json() -> None:
    e = versions.rollback(pushed("a", "b", canary=30), 200, 600, failed="x")
    assert Entry.from_json(e.to_json()) == e


@pytest.mark.parametrize("candidate, good, fails", [
    (Health(started=3, failed=3), Health(started=100, failed=1), True),   # every stream
    (Health(started=10, failed=2), Health(started=100), False),           # too few yet
    (Health(started=30, failed=3), Health(started=100, failed=5), False),  # 10 %: not 20
    (Health(started=10, failed=4), Health(started=10, failed=3), False),   # no worse x3
    (Health(started=10, failed=4), Health(), True),                        # good unproven
    (Health(load_failed=1), Health(), True),                               # never loaded
    (Health(loaded=3, load_failed=1), Health(), False),                    # one bad machine
    (Health(loaded=3, load_failed=2), Health(), True),
])
def test_automatic_rollback_rule(candidate: Health, good: Health, fails: bool) -> None:
    assert bool(versions.failure(candidate, good)) is fails
