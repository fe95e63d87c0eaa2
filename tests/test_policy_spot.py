"""The policy with spot offered: its share of each pool, where it boots, a noticed node's
replacement, and the hedge where a boot outlasts the notice (issue 21)."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest
from test_policy import CFG, DRAINING, NOW, demand, key, node, snap

from provisioner.policy import decide, decide_fixed_buffer, decide_reactive

SPOT = replace(CFG, spot_price_per_hour_by_provider={"minute": Decimal("0.40")},
               spot_share=0.75)


@pytest.mark.parametrize(("spot_nodes", "plain_nodes", "waiting", "share", "spot", "boot"), [
    (0, 0, 16, 0.75, 3, 1),    # four nodes for sixteen users: three on spot
    (0, 0, 4, 0.75, 0, 1),     # a pool of one node keeps it on-demand below a share of 1
    (0, 0, 4, 1.0, 1, 0),      # ... and on spot at 1
    (2, 0, 8, 0.75, 1, 1),     # two spot nodes up: of four, one more on spot
    (0, 2, 8, 0.75, 2, 0),     # two on-demand up: of four, both new ones on spot
    (0, 0, 16, 0.0, 0, 4),     # share 0: on-demand only
])
def test_spot_share_splits_the_boots_of_a_pool(spot_nodes: int, plain_nodes: int,
                                               waiting: int, share: float, spot: int,
                                               boot: int) -> None:
    """Where spot is offered, up to `spot_share` of a pool's nodes (up, coming and
    booted now) are spot nodes; the rest boot on-demand."""
    up = [replace(node(f"s{i}", sessions=4), spot=True) for i in range(spot_nodes)]
    up += [node(f"p{i}", sessions=4) for i in range(plain_nodes)]
    d = decide(snap(*up, pools=(demand(key(), waiting=waiting),)), NOW,
               replace(SPOT, spot_share=share))
    assert (len(d.spot), len(d.boot)) == (spot, boot)
    assert set(d.spot) | set(d.boot) == {key()}


def test_spot_only_where_offered_and_only_by_the_autoscaler() -> None:
    """No spot where the region's provider offers none, nor from the baselines; a spot
    node is priced at its spot price."""
    east = (demand(key(region="east"), waiting=16),)
    d = decide(snap(pools=east), NOW, replace(SPOT, spot_share=1.0))
    assert d.spot == () and len(d.boot) == 4
    west = (demand(key(), waiting=16),)
    for baseline in (decide_fixed_buffer, decide_reactive):
        assert baseline(snap(pools=west), NOW, replace(SPOT, spot_share=1.0)).spot == ()
    assert SPOT.node_price(node("s", provider="minute")) == Decimal("1.10")
    assert SPOT.node_price(replace(node("s"), spot=True)) == Decimal("0.40")


def test_spot_offered_the_region_buffer_boots_on_spot_within_the_share() -> None:
    pools = (demand(key("miku"), rate=0.1), demand(key("teto"), rate=0.1))
    d = decide(snap(pools=pools), NOW, replace(SPOT, spot_share=1.0))
    plain = decide(snap(pools=pools), NOW, CFG)
    assert d.spot and d.boot == () and len(plain.boot) == len(d.spot)


def test_a_noticed_spot_node_is_replaced_at_once() -> None:
    """Told of its interruption, a spot node drains: its users count as its pool's demand
    and the node as nobody's capacity, so the policy boots their room now."""
    noticed = replace(node("s", sessions=4, state=DRAINING), spot=True)
    full = node("p", sessions=4)
    d = decide(snap(noticed, full), NOW, SPOT)
    assert len(d.boot) + len(d.spot) == 1 and d.stop == () and d.drain == ()


@pytest.mark.parametrize(("boot_s", "spot", "wanted"), [
    (90.0, True, 0),     # a new node is ready within the 2-minute notice: no hedge
    (150.0, False, 0),   # too slow for the notice, but no spot node serves anyone
    (150.0, True, 1),    # too slow: room for a spot node's users on the others, kept free
])
def test_where_a_boot_outlasts_the_notice_a_pool_keeps_room_for_a_spot_nodes_users(
        boot_s: float, spot: bool, wanted: int) -> None:
    cfg = replace(SPOT, boot_s_by_provider={**CFG.boot_s_by_provider, "minute": boot_s})
    nodes = (replace(node("s", sessions=2), spot=spot), node("p", sessions=3))
    d = decide(snap(*nodes), NOW, cfg)
    assert len(d.boot) + len(d.spot) == wanted
    assert decide(snap(*nodes), NOW, replace(cfg, spot_share=0.0)).boot == ()


@pytest.mark.parametrize(("boot_s", "drained"), [(90.0, ("a",)), (150.0, ())])
def test_consolidation_leaves_the_spot_hedge_free(boot_s: float,
                                                   drained: tuple[str, ...]) -> None:
    """Emptying a into b and s would leave three free slots: room enough where a new node is
    ready within a spot notice, too little where the pool must keep a node's worth free
    for the users of its spot node s."""
    cfg = replace(SPOT, stop_margin_slots=0,
                  boot_s_by_provider={**CFG.boot_s_by_provider, "minute": boot_s})
    nodes = (node("a", sessions=1), node("b", sessions=2),
             replace(node("s", sessions=2), spot=True))
    assert decide(snap(*nodes), NOW, cfg).drain == drained
