"""What each clip of a source is: its id, source, license, captions (with their provenance) and held-out status.

Layouts known by folder name (the more-mocap archive's, see its README), anything else is a labelled source:
- ``cmu-cc3/``, ``cmu-daz/``, ``cmu-deepmimic/.../SS_TT.*``: CMU trial SS_TT, id ``<folder>_SS_TT``. The same trial
  in several folders is kept once (:data:`DEDUP_PREFERENCE`). Captions: the trial's KIT-ML captions where
  ``kitml_cmu_captions.json`` has them, completed from its ``cmu_index.csv`` description; the description alone
  otherwise. A description naming a calibration, T-pose, range of motion or "unknown" is skipped with that reason.
- ``cmu-dance/<style>/NN.bvh``: id ``cmu-dance_<style>_NN``, captions from the style (``class_captions.json``);
  the folder's ``standard.bvh`` is the shared skeleton, not a take.
- ``cmu-deepmimic/extra/humanoid3d_<name>.txt``: DeepMimic's own clips, id ``deepmimic_<name>``, captions from the name.
- ``hdm05/{train,test}/K/HDM_<actor>_<class>_<NNN>_120.amc``: id ``hdm05_<actor>_<class>_<NNN>``, captions from the
  class; ``test/`` holds performers never seen in ``train/`` (held out).
- Anything else (e.g. Bandai-Namco): id = file stem, captions from (content, style) labels (``backend.data.prepare``).
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

from backend.data.captions import stable_seed

CLASS_CAPTIONS_FILE = Path(__file__).with_name("class_captions.json")
CMU_FOLDERS = ("cmu-cc3", "cmu-daz", "cmu-deepmimic")
DEDUP_PREFERENCE = CMU_FOLDERS
DEDUP_REASON = ("kept the first of cmu-cc3 (60 fps, the richest skeleton: toes, three spine joints), cmu-daz "
                "(120 fps, no toe joint), cmu-deepmimic (retargeted to a simplified humanoid with 1-angle knees and "
                "elbows) that prepared")
CMU_LICENSE = ("CMU Graphics Lab Motion Capture Database (mocap.cs.cmu.edu; funded by NSF EIA-0196217): free to use, "
               "commercial use included, credit requested; conversions from MIT-licensed repositories")
LICENSES = {
    "cmu-cc3": CMU_LICENSE, "cmu-daz": CMU_LICENSE, "cmu-deepmimic": CMU_LICENSE, "cmu-dance": CMU_LICENSE,
    "deepmimic": "DeepMimic's own clips (MIT-licensed repository; capture source not stated)",
    "hdm05": "HDM05 (Mueller et al., Universitaet Bonn, CG-2007-2): research use with citation, no commercial rights",
}


@dataclass(frozen=True)
class ClipSpec:
    """Who a clip is (decided from its path alone, before it is read)."""

    clip_id: str
    source: str
    trial: str | None = None  # CMU "SS_TT" (the duplicate key)
    label: str | None = None  # class / style / file name the captions come from
    held_out: bool = False  # a take the source holds back (never seen in training)
    known_layout: bool = False  # False: a labelled source (captions from content/style labels)


@dataclass
class Texts:
    """The texts a source ships: CMU descriptions and KIT-ML captions by trial."""

    descriptions: dict[str, str] = field(default_factory=dict)
    kit: dict[str, list[str]] = field(default_factory=dict)


def clip_spec(member: str) -> ClipSpec:
    """The clip's id, source and held-out status from its path (module docstring)."""
    path = PurePosixPath(member)
    parts = [p.lower() for p in path.parts[:-1]]
    stem = path.stem
    if "hdm05" in parts:
        match = re.match(r"^HDM_([a-z]+)_([A-Za-z0-9]+)_(\d+)(?:_\d+)?$", stem)
        if match:
            actor, label, number = match.groups()
            held = "test" in parts[parts.index("hdm05"):]
            return ClipSpec(f"hdm05_{actor}_{label}_{number}", "hdm05", label=label, held_out=held, known_layout=True)
    if "cmu-dance" in parts:
        style = path.parent.name
        return ClipSpec(f"cmu-dance_{style}_{stem}", "cmu-dance", label=style if style != "cmu-dance" else None,
                        known_layout=True)
    if "cmu-deepmimic" in parts and "extra" in parts:
        name = stem.removeprefix("humanoid3d_")
        return ClipSpec(f"deepmimic_{name}", "deepmimic", label=name, known_layout=True)
    folder = next((f for f in CMU_FOLDERS if f in parts), None)
    match = re.match(r"^(\d+)_(\d+)$", stem)
    if folder and match:
        trial = f"{int(match[1]):02d}_{int(match[2]):02d}"
        return ClipSpec(f"{folder}_{trial}", folder, trial=trial, known_layout=True)
    if folder:
        return ClipSpec(stem, folder)  # not a CMU trial name: a labelled clip in that folder
    return ClipSpec(stem, "bandai-namco" if "bandai-namco" in member.lower() else path.parts[0] if len(
        path.parts) > 1 else "labelled")


def load_texts(files: dict[str, bytes]) -> Texts:
    """CMU descriptions (``cmu_index.csv``) and KIT-ML captions (``kitml_cmu_captions.json``) found in a source."""
    texts = Texts()
    for member, data in files.items():
        name = PurePosixPath(member).name.lower()
        if name == "cmu_index.csv":
            for row in csv.reader(io.StringIO(data.decode("utf-8", errors="replace"))):
                if len(row) >= 3 and row[0].strip().isdigit() and row[1].strip().isdigit():
                    texts.descriptions[f"{int(row[0]):02d}_{int(row[1]):02d}"] = row[2].strip()
        elif name == "kitml_cmu_captions.json":
            for trial, entry in json.loads(data).items():
                s, t = trial.split("_")
                captions = [" ".join(a["text"].replace("#", " ").split()) for a in entry.get("annotations", [])
                            if a.get("text", "").strip()]  # one line, no '#' (HumanML3D's field separator)
                texts.kit[f"{int(s):02d}_{int(t):02d}"] = list(dict.fromkeys(captions))
    return texts


@lru_cache(maxsize=1)
def vocabulary() -> dict[str, Any]:
    """``class_captions.json`` (see its ``about``)."""
    return json.loads(CLASS_CAPTIONS_FILE.read_text(encoding="utf-8"))


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _part_phrase(part: str) -> str:
    """One comma-separated part of a CMU description as a verb phrase (third person)."""
    vocab = vocabulary()
    if part in vocab["cmu_parts"]:
        return vocab["cmu_parts"][part]
    verbs = set(vocab["cmu_verbs"])
    words = [w.split("/")[0] if "/" in w and w.split("/")[0] in verbs else w for w in part.split()]
    if part in vocab["cmu_nouns"] or (words and words[0] in vocab["cmu_nouns"] and len(words) == 1):
        return vocab["cmu_nouns"][part if part in vocab["cmu_nouns"] else words[0]]
    segments: list[list[str]] = []
    lead: list[str] = []
    for w in words:
        if w in verbs:
            segments.append([_third_person(w)])
        elif segments:
            segments[-1].append(w)
        else:
            lead.append(w)
    if not segments:
        return "does " + part
    if lead:  # "forward dribble" -> "dribbles forward", "slow walk" -> "walks slowly"
        segments[0] += [vocab["cmu_adverbs"].get(w, w) for w in lead]
    for s in segments[:-1]:
        if s[-1] == "to":  # "walk to run" -> "walks, then runs"
            s.pop()
    return ", then ".join(" ".join(s) for s in segments)


def skip_reason(description: str) -> str | None:
    """Why a CMU description is not plain human motion for text-to-motion (calibration, T-pose, unknown), or None."""
    text = description.lower()
    hit = next((w for w in vocabulary()["skip"] if w in text), None)
    return f"description {description!r} is not plain human motion ({hit})" if hit else None


def description_phrases(description: str) -> tuple[str, str | None]:
    """(verb phrase, context phrase or None) of a CMU description: "playground - climb, jump down" ->
    ("climbs, jumps down", "on a playground")."""
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", description).lower().strip()
    context, sep, rest = text.partition(" - ")
    if not sep:
        context, rest = "", text
    parts = [p.strip() for p in rest.split(",") if p.strip()]
    phrases = [_part_phrase(p) for p in parts] or ["moves"]
    if context == "dance":
        return "dances: " + ", ".join(p.removeprefix("does ") for p in phrases), None
    joined = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    contexts = vocabulary()["cmu_contexts"]
    return joined, contexts.get(context, context or None)


def class_phrases(label: str) -> list[str]:
    """The verb phrases of a class, folder or file name (the longest key it starts with); ValueError if none."""
    classes = vocabulary()["classes"]
    keys = [k for k in classes if label.lower().startswith(k.lower())]
    if not keys:
        raise ValueError(f"no captions for class {label!r}; add it to {CLASS_CAPTIONS_FILE.name}")
    return classes[max(keys, key=len)]


def _pick(clip_id: str, forms: list[list[str]], count: int) -> list[str]:
    rng = random.Random(stable_seed(clip_id))
    pools = [rng.sample(f, len(f)) for f in forms]
    picked: list[str] = []
    while len(picked) < count and any(pools):
        for pool in pools:
            while pool and len(picked) < count:
                caption = pool.pop()
                if caption not in picked:
                    picked.append(caption)
                    break
    return picked


def clip_captions(spec: ClipSpec, texts: Texts, count: int) -> tuple[list[str], str]:
    """(captions, where they came from) for a clip of a known layout; ValueError (the reason) for one to skip."""
    subjects = vocabulary()["subjects"]
    if spec.trial is not None:
        description = texts.descriptions.get(spec.trial)
        kit = [c[0].lower() + c[1:] for c in texts.kit.get(spec.trial, [])]
        if description is None and not kit:
            raise ValueError(f"CMU trial {spec.trial} has no description in cmu_index.csv and no KIT-ML caption")
        reason = skip_reason(description) if description else None
        if reason:
            raise ValueError(reason)
        own: list[str] = []
        if description:
            verb, context = description_phrases(description)
            forms = [[f"{s} {verb}" for s in subjects]]
            if context:
                forms.append([f"{s} {context} {verb}" for s in subjects])
            own = _pick(spec.clip_id, forms, count)
        captions = (kit + [c for c in own if c not in kit])[:max(count, len(kit))]
        origin = ("KIT-ML" + (" + CMU description" if len(kit) < len(captions) else "")) if kit else "CMU description"
        return captions, origin
    if spec.label is None:
        raise ValueError("not a take: no class, folder or file name to caption it from (e.g. cmu-dance/standard.bvh is "
                         "the dances' shared skeleton)")
    phrases = class_phrases(spec.label)
    return _pick(spec.clip_id, [[f"{s} {p}" for s in subjects] for p in phrases], count), f"class name {spec.label!r}"
