"""Grow: replicas added one at a time to a layer above target, an expert of the busiest group
onto a lighter one (making room on a full group by a drop or a move when none has a free
slot), planned on an estimate (_Levels) between exact share solves. Used by both paths of
planner.py: migration-aware (decide) and from scratch (layers short of target).

Slots and shares are [L, G, S] per call (one layer: [G, S]); loads [L, E]; had [L, G, E]
whether a group held an expert before (current's sets; from scratch, the packing's own), which
halves the price of putting it back. L = MoE layers, E = experts per layer, G = groups, S = slots
per layer per group. grow() is the package's internal API, not for outside use.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cluster.placement.layout import Placement, to_slots
from cluster.placement.shares import solve


def grow(slots, shares, imb, loads, keep, had, config):
    """(slots, [L] imbalance): replicas added to layers above target in rounds, each planned on
    an estimate (_grow_layer), then shares solved exactly. A round may overshoot, so a layer
    keeps its best state; one whose round changes nothing is done."""
    slots, shares, best, best_imb = slots.copy(), shares.copy(), slots.copy(), imb.copy()
    active = np.nonzero(imb > config.target_imbalance)[0]
    for _ in range(config.grow_rounds):
        if not active.size:
            break
        gl = Placement(slots[active], shares[active]).group_loads(loads[active])
        cap = (1 + AIM * (config.target_imbalance - 1)) * gl.mean(axis=1)
        grew = [_grow_layer(slots[l], shares[l], loads[l], keep[l], had[l], cap[i]) for i, l in enumerate(active)]
        active = active[np.array(grew, dtype=bool)]
        if not active.size:
            break
        shares[active], imb = solve(slots[active], loads[active], config)
        better = imb < best_imb[active] - 1e-12
        best[active[better]], best_imb[active[better]] = slots[active[better]], imb[better]
        active = active[imb > config.target_imbalance]
    return best, best_imb


def _grow_layer(slots, shares, w, keep, had, cap) -> bool:
    """One layer, in place, on an estimate (_Levels): while the highest level is above cap,
    replicate one of its three heaviest experts onto the receiver that moves the most load per
    weight load (_Levels.receivers). Returns whether anything changed."""
    G, S = slots.shape
    lv = _Levels(slots, shares, w)
    count = np.bincount(slots[slots >= 0], minlength=len(w))
    fresh: set[int] = set()  # experts replicated or moved here: never dropped or moved again (no ping-pong)
    changed = False
    for _ in range(G * S):
        level = lv.level()
        h = int(np.argmax(level))
        if level[h] <= cap:
            break
        top = lv.carried_in(lv.comp[h])
        best = (1e-12 * (lv.mean + 1e-300), None)
        view = lv.view(level, h, S)
        for e in sorted(top, key=lambda e: (-top[e], e))[:TRIED]:
            if count[e] < G:
                for value, g, action, t in lv.receivers(view, e, top[e], count, keep, had, fresh):
                    if value > best[0]:
                        best = (value, (e, g, action, t))
        if best[1] is None:
            break  # nothing on the highest level can go anywhere
        e, g, action, t = best[1]
        if action is not None:
            x, o = action
            count[x] -= x in lv.carried[o]
            lv.shift(g, o, x, lv.carried[g][x])
            fresh.add(x)
        lv.replicate(h, g, e, t)
        fresh.add(e)
        count[e] += 1
        changed = True
    if changed:
        slots[:] = to_slots([[set(c) for c in lv.carried]], S)[0]
    return changed


AIM = 0.8  # grow plans for 80% of the allowed excess: the estimate lands a little high
TRIED = 3  # experts of the top level tried per add, heaviest first
RECEIVERS = 8  # full groups examined per add, lowest level first: a light group frees the most room


class _Levels:
    """One layer as the share solve leaves it: groups joined by an expert whose shares balance
    them sit in a component at one level, and load moved into any of them spreads over all.
    _grow_layer plans several adds on this estimate between two exact share solves."""

    def __init__(self, slots, shares, w):
        G = len(slots)
        self.carried = [{int(e): w[e] * s for e, s in zip(slots[g], shares[g]) if e >= 0} for g in range(G)]
        est = np.array([sum(c.values()) for c in self.carried])
        self.mean = est.mean()
        self.comp = np.arange(G)
        self.load, self.size = est.copy(), np.ones(G)
        holders: dict[int, list[int]] = {}
        for g, c in enumerate(self.carried):
            for e, x in c.items():
                if x > 1e-9 * self.mean:
                    holders.setdefault(e, []).append(g)
        for gs in holders.values():  # within 1% of the mean: one level, up to the solve's accuracy
            for a, b in zip(gs, gs[1:]):
                if abs(est[a] - est[b]) <= 0.01 * self.mean:
                    self.merge(self.comp[a], self.comp[b])

    def level(self) -> np.ndarray:
        return self.load[self.comp] / self.size[self.comp]

    def merge(self, a, b) -> None:
        if a != b:
            self.comp[self.comp == b] = a
            self.load[a], self.size[a] = self.load[a] + self.load[b], self.size[a] + self.size[b]
            self.load[b], self.size[b] = 0.0, 0.0

    def carried_in(self, c) -> dict:
        total: dict[int, float] = {}
        for g in np.nonzero(self.comp == c)[0]:
            for e, x in self.carried[g].items():
                total[e] = total.get(e, 0.0) + x
        return total

    def shift(self, g, o, x, c) -> None:
        """Expert x leaves group g, its load c going to group o (a holder, or its new home)."""
        del self.carried[g][x]
        self.carried[o][x] = self.carried[o].get(x, 0.0) + c
        self.load[self.comp[g]] -= c
        self.load[self.comp[o]] += c

    def replicate(self, h, g, e, t) -> None:
        """A replica of e on g takes load t from e's holders at h's level; equal levels join."""
        a, b = self.comp[h], self.comp[g]
        holders = [k for k in np.nonzero(self.comp == a)[0] if self.carried[k].get(e, 0.0) > 0]
        total = sum(self.carried[k][e] for k in holders)
        for k in holders:
            self.carried[k][e] -= t * self.carried[k][e] / total
        self.carried[g][e] = t
        self.load[a] -= t
        self.load[b] += t
        if abs(self.load[a] / self.size[a] - self.load[b] / self.size[b]) <= 1e-9 * self.mean:
            self.merge(a, b)

    def view(self, level, h, S) -> "_View":
        lvl, comp = level.tolist(), self.comp.tolist()
        below = [g for g in np.argsort(level, kind="stable").tolist() if comp[g] != comp[h] and lvl[g] < lvl[h]]
        spare = [o for o, c in enumerate(self.carried) if len(c) < S]
        return _View(lvl, comp, self.size.tolist(), h, S, below, spare, {})

    def receivers(self, v, e, carried, count, keep, had, fresh):
        """(load off h's level per weight load, group, room-making action, load moved) for a new
        replica of e: a group below h's level that lacks e, with a free slot (cost 1; half if it
        held e in current), or full and dropping a replica above its expert's keep count (cost
        1) or moving its lightest single expert to a group with room (cost 2). Load a room-making
        move sends to h's level counts against the gain; no other level may pass h's."""
        held, S, a = self.carried, v.S, v.comp[v.h]
        order = [g for g in v.below if e not in held[g]]
        room = [g for g in order if len(held[g]) < S]
        picks = room[:1] + [g for g in room if had[g, e]][:1] + [g for g in order[:RECEIVERS] if len(held[g]) >= S]
        for g in picks:
            b = v.comp[g]
            if len(held[g]) < S:
                options = [(0.5 if had[g, e] else 1.0, 0.0, 0.0, None)]
            elif g in v.room_for:
                options = v.room_for[g]
            else:
                options = v.room_for[g] = self._make_room(v, g, count, keep, fresh)
            for cost, freed, back, action in options:
                sa, sb = v.size[a], v.size[b]
                gap = (self.load[a] + back) / sa - (self.load[b] - freed) / sb
                t = min(carried, gap * sa * sb / (sa + sb))
                if t > back:
                    yield (t - back) / cost, g, action, t

    def _make_room(self, v, g, count, keep, fresh) -> list:
        """Ways to free a slot on full group g: (cost, load leaving g's level, load landing on
        h's level, (expert, where it goes))."""
        held, options = self.carried, []
        drops = [(c, x) for x, c in held[g].items() if count[x] > keep[x] and x not in fresh]
        singles = [(c, x) for x, c in held[g].items() if count[x] == 1 and x not in fresh]
        for cost, pool in ((1.0, drops), (2.0, singles)):
            if pool:
                c, x = min(pool)
                places = ([o for o in range(len(held)) if o != g and x in held[o]] if cost == 1.0
                          else [o for o in v.spare if x not in held[o]])
                land = _landing(v, g, c, places, 0.05 * self.mean)
                if land is not None:
                    options.append((cost, c if v.comp[land[0]] != v.comp[g] else 0.0, land[1], (x, land[0])))
        return options


def _landing(v: "_View", g, c, places, negligible):
    """(group, load landing at h's level) where load c leaving group g goes: the lowest level
    it keeps below h's, else h's own (costing c); never g's component unless c is negligible
    (the expert may be the very bridge that holds that level)."""
    a, b = v.comp[v.h], v.comp[g]
    fits = [o for o in places if v.comp[o] not in (a, b) and v.lvl[o] + c / v.size[v.comp[o]] < v.lvl[v.h]]
    if fits:
        return min(fits, key=lambda o: (v.lvl[o], o)), 0.0
    same = [o for o in places if v.comp[o] == b and c <= negligible]
    top = [o for o in places if v.comp[o] == a]
    return (same[0], 0.0) if same else (top[0], c) if top else None


class _View(NamedTuple):
    """What _Levels.receivers reads for one add, as plain lists (numpy scalars are slow here)."""
    lvl: list  # [G] level of each group
    comp: list  # [G] component of each group
    size: list  # [G] groups in each component (by component id)
    h: int  # the group at the highest level
    S: int
    below: list  # groups below h's level outside its component, lowest first
    spare: list  # groups with a free slot
    room_for: dict  # group -> _make_room's options, cached across the experts tried
