"""Deterministic train / val / test / test_unseen_pairs splits of labelled clips.

Every decision hashes a name with SHA-256 (:func:`backend.data.captions.stable_seed`), so a clip's split
depends only on its id and labels: the same on every machine, and unchanged when other clips come or go
(except for the capped choice of held-out pairs). The rules, as :data:`RULES` states them in dataset.json:
"""

from __future__ import annotations

from collections import Counter, defaultdict

from backend.data.captions import label_key, stable_seed

UNSEEN_PAIR_FRACTION = 0.05
TEST_FRACTION = 0.07
VAL_FRACTION = 0.05
MIN_TAKES_FOR_TEST = 3

RULES = [
    "Labels are compared without their 'dataset-N_' prefix and after the caption templates' aliases (old = elderly, "
    "masculinity = masculine), so a (content, style) pair spans both Bandai sets.",
    f"test_unseen_pairs: whole (content, style) pairs held out, never seen in train/val/test. Candidates: pairs "
    f"whose style is not 'normal', whose content keeps >= 2 other styles and whose style keeps >= 2 other "
    f"contents outside the held-out set. Taken in SHA-256 order of 'pair:CONTENT|STYLE' while the held-out "
    f"clips stay within {UNSEEN_PAIR_FRACTION:.0%} of all clips.",
    f"test (unseen takes of seen pairs) and val: each remaining clip by u = SHA-256('split:ID') / 2^64: "
    f"test if u < {TEST_FRACTION}, val if u < {TEST_FRACTION + VAL_FRACTION:.2f}, else train. Pairs with fewer than "
    f"{MIN_TAKES_FOR_TEST} takes stay wholly in train, and every pair keeps at least one take in train.",
    "Clips without (content, style) labels go to train.",
    f"Clips of sources without (content, style) labels (CMU trials, HDM05, DeepMimic): test if the source holds "
    f"the take back (HDM05's test/ performers, never seen in train), else by u as above: test (whole CMU trials, "
    f"each kept once, never seen in train) if u < {TEST_FRACTION}, val if u < {TEST_FRACTION + VAL_FRACTION:.2f}, "
    "else train.",
]
__doc__ += "\n".join(f"\n- {r}" for r in RULES)


def _unit(text: str) -> float:
    return stable_seed(text) / 2.0**64


def make_splits(clips: dict[str, tuple[str, str] | None]) -> dict[str, list[str]]:
    """Split clip ids. ``clips`` maps id -> (content, style) or None. Returns sorted id lists per split."""
    pairs: dict[tuple[str, str], list[str]] = defaultdict(list)
    unlabelled = []
    for clip_id, label in clips.items():
        if label is None:
            unlabelled.append(clip_id)
        else:
            pairs[(label_key(label[0]), label_key(label[1]))].append(clip_id)

    held: set[tuple[str, str]] = set()
    budget = UNSEEN_PAIR_FRACTION * len(clips)
    held_clips = 0
    styles_of = Counter(c for c, _ in pairs)
    contents_of = Counter(s for _, s in pairs)
    for pair in sorted(pairs, key=lambda p: stable_seed(f"pair:{p[0]}|{p[1]}")):
        content, style = pair
        if style == "normal" or held_clips + len(pairs[pair]) > budget:
            continue
        if styles_of[content] - 1 < 2 or contents_of[style] - 1 < 2:
            continue
        held.add(pair)
        held_clips += len(pairs[pair])
        styles_of[content] -= 1
        contents_of[style] -= 1

    out: dict[str, list[str]] = {"train": list(unlabelled), "val": [], "test": [], "test_unseen_pairs": []}
    for pair, ids in pairs.items():
        if pair in held:
            out["test_unseen_pairs"] += ids
            continue
        if len(ids) < MIN_TAKES_FOR_TEST:
            out["train"] += ids
            continue
        u = {i: _unit(f"split:{i}") for i in ids}
        keep = max(ids, key=u.get)  # the take most likely to be train anyway
        for i in ids:
            split = "test" if u[i] < TEST_FRACTION else "val" if u[i] < TEST_FRACTION + VAL_FRACTION else "train"
            out["train" if i == keep else split].append(i)
    return {k: sorted(v) for k, v in out.items()}


def held_out_pairs(clips: dict[str, tuple[str, str] | None], splits: dict[str, list[str]]) -> list[list[str]]:
    """The (content, style) pairs of test_unseen_pairs, sorted."""
    pairs = {(label_key(clips[i][0]), label_key(clips[i][1])) for i in splits["test_unseen_pairs"]}
    return [list(p) for p in sorted(pairs)]


def take_splits(clips: dict[str, bool]) -> dict[str, list[str]]:
    """Split clips of a source without (content, style) pairs: ``clips`` maps id -> held out by the source (e.g.
    HDM05's test performers) -> test; the rest by :data:`RULES` (unseen takes). Sorted id lists per split."""
    out: dict[str, list[str]] = {"train": [], "val": [], "test": [], "test_unseen_pairs": []}
    for clip_id, held in clips.items():
        u = _unit(f"split:{clip_id}")
        split = "test" if held or u < TEST_FRACTION else "val" if u < TEST_FRACTION + VAL_FRACTION else "train"
        out[split].append(clip_id)
    return {k: sorted(v) for k, v in out.items()}
