"""Prepare one or several folders or archives of motion clips as one dataset in HumanML3D's layout.

Pipeline per clip: read (BVH, ASF/AMC or DeepMimic JSON: ``backend.data.readers``) -> joint map (``--map``, else
chosen by bone names and rest geometry: ``backend.data.retarget.choose_map``) -> ``retarget_rotations`` to SMPL22
rotations over its rest pose, twist included, 20 fps, metres, Y up -> ``backend.motion.canonicalize_rotations``
(positions = their forward kinematics, placed on the floor facing +Z) -> ``positions_to_features`` with those
rotations in the rotation channels -> ``new_joint_vecs/ID.npy`` (T-1, 263); ``new_joints/ID.npy`` =
``features_to_positions(features)`` (T-1, 22, 3). Then captions (``texts/ID.txt``), deterministic splits,
``Mean.npy``/``Std.npy`` over the train split, and ``dataset.json`` (per clip: source, license, caption provenance,
joint map and what it dropped).

Sources: folders (searched recursively), or .tar/.tar.gz/.tgz/.tar.xz/.tar.bz2/.zip archives read in one
streaming pass each (never unpacked to disk). Clips of a known layout (the more-mocap archive's folders:
``backend.data.catalog``) get their id, captions, license and held-out status from it; duplicate CMU trials are kept
once. Other clips need labels: ``--labels FILE.json`` ({id: {"content": ..., "style": ...}}), else a ``.json``
beside each clip ({"content": N, "style": M}, names or indices into the nearest ``cfg/content_label.txt`` /
``cfg/style_label.txt``, the Bandai-Namco layout). A clip that fails (parse error, unknown skeleton, no labels, ...)
is reported by name on stderr and in dataset.json (``failures``); one left out on purpose (a duplicate trial, a
calibration take, a skeleton file) is listed with its reason (``skipped``).
The dataset is built in a temporary sibling folder and moved into place at the end, so a reader of OUT never
sees a half-written dataset.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from backend.data.captions import caption_lines, label_key, make_captions
from backend.data.catalog import DEDUP_PREFERENCE, DEDUP_REASON, LICENSES, clip_captions, clip_spec, load_texts
from backend.data.readers import clip_kind, context_member, drop_calibration_frame, read_clip
from backend.data.retarget import (
    Clip,
    JointMap,
    choose_map,
    load_map,
    mapping_report,
    retarget_rotations,
    unmapped_joints,
)
from backend.data.splits import RULES, held_out_pairs, make_splits, take_splits
from backend.motion import canonicalize_rotations, features_to_positions, positions_to_features
from backend.skeleton import SMPL22, Skeleton

WANTED_SUFFIXES = (".bvh", ".amc", ".asf", ".json", ".txt", ".csv")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".zip")
CAPTIONS_PER_CLIP = 4
SPLIT_NAMES = ("train", "val", "test", "test_unseen_pairs")
ROUNDTRIP_TOLERANCE_M = 0.01  # features_to_positions(features) must land this close to the canonical positions
KNOWN_LICENSES = {"Attribution-NonCommercial 4.0 International": "CC BY-NC 4.0"}


@dataclass(frozen=True)
class ClipResult:
    """What preparing one clip gave: frame counts and checks, or the error that made it fail."""

    clip_id: str
    member: str
    error: str | None = None
    frames: int = 0  # feature frames written (T - 1 at 20 fps)
    source_frames: int = 0
    source_fps: float = 0.0
    joint_map: str = ""
    unmapped: tuple[str, ...] = ()
    roundtrip_error_m: float = 0.0  # max |features_to_positions(features) - canonical positions|
    source: int = 0  # index of the source it came from
    mapping: dict[str, Any] | None = None  # backend.data.retarget.mapping_report without the shared "mapped"
    notes: tuple[str, ...] = ()  # what reading changed (e.g. a dropped calibration frame)


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def iter_source(source: Path) -> Iterator[tuple[str, bytes]]:
    """(relative member path, bytes) for every clip (.bvh, .amc, DeepMimic .txt), text and skeleton file
    (.json, .txt, .csv, .asf) and LICENSE file of a folder or archive."""

    def wanted(name: str) -> bool:
        name = name.lower()
        return name.endswith(WANTED_SUFFIXES) or PurePosixPath(name).name.startswith("license")

    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_file() and wanted(path.name):
                yield path.relative_to(source).as_posix(), path.read_bytes()
    elif source.name.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(source) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and wanted(info.filename):
                        yield PurePosixPath(info.filename).as_posix(), zf.read(info)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"{source}: not a readable zip archive ({exc})") from None
    else:
        try:
            with tarfile.open(source, mode="r|*") as tf:
                for member in tf:
                    if member.isfile() and wanted(member.name):
                        handle = tf.extractfile(member)
                        if handle is not None:
                            yield PurePosixPath(member.name).as_posix(), handle.read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ValueError(f"{source}: not a readable tar archive ({exc})") from None


_WORKER_MAP: JointMap | None = None
_WORKER_OUT: Path | None = None


def _init_worker(jmap: JointMap | None, out: Path) -> None:
    global _WORKER_MAP, _WORKER_OUT
    _WORKER_MAP, _WORKER_OUT = jmap, out
    torch.set_num_threads(1)  # one process per core; torch's own threads only contend for it


def clip_features(bvh: Clip, jmap: JointMap) -> tuple[np.ndarray, np.ndarray]:
    """One parsed clip's features (T-1, D) and canonical joint positions (T, J, 3), float64 (the module
    docstring's pipeline). Raises ValueError for a clip that does not fit the map or is too short."""
    root, rotations = retarget_rotations(bvh, jmap)
    if root.shape[0] < 2:
        raise ValueError(f"{bvh.num_frames} source frames give {root.shape[0]} at 20 fps; need >= 2")
    canonical, rotations = canonicalize_rotations(root, rotations, jmap.skeleton)
    return positions_to_features(canonical, jmap.skeleton, rotations=rotations), canonical


Item = tuple[str, str, str, bytes, bytes | None, int]  # clip id, member, kind, data, context, source index


def _prepare_clip(item: Item) -> ClipResult:
    """Read, retarget and featurise one clip, write its .npy files; never raises."""
    clip_id, member, kind, data, context, source = item
    try:
        motion = read_clip(member, kind, data, context)
        jmap = _WORKER_MAP or choose_map(motion)
        motion, dropped = drop_calibration_frame(motion, jmap)
        notes = [f"dropped the first {dropped} frames: a calibration T-pose and the blend out of it"] if dropped else []
        features, canonical = clip_features(motion, jmap)
        joints = features_to_positions(features)
        if not (np.isfinite(features).all() and np.isfinite(joints).all()):
            raise ValueError("features are not finite")
        roundtrip = float(np.abs(joints - canonical[:-1]).max())
        if roundtrip > ROUNDTRIP_TOLERANCE_M:
            raise ValueError(f"features_to_positions(features) is {roundtrip:.3f} m off the retargeted "
                             f"positions (tolerance {ROUNDTRIP_TOLERANCE_M} m)")
        assert _WORKER_OUT is not None
        np.save(_WORKER_OUT / "new_joint_vecs" / f"{clip_id}.npy", features.astype(np.float32))
        np.save(_WORKER_OUT / "new_joints" / f"{clip_id}.npy", joints.astype(np.float32))
        report = mapping_report(motion, jmap, "--map" if _WORKER_MAP else "bone names and rest geometry")
        del report["mapped"]  # the same for every clip of a map: dataset.json lists it once per map
        return ClipResult(
            clip_id, member, frames=features.shape[0], source_frames=motion.num_frames,
            source_fps=round(motion.fps, 3), joint_map=jmap.name, unmapped=tuple(unmapped_joints(motion, jmap)),
            roundtrip_error_m=roundtrip, source=source, mapping=report, notes=tuple(notes),
        )
    except Exception as exc:  # reported by name and skipped, never silently
        message = str(exc).removeprefix(f"{member}: ")  # the failure is listed under its member name anyway
        if not isinstance(exc, ValueError):
            message = f"{type(exc).__name__}: {message}"
        return ClipResult(clip_id, member, error=message, source=source)


def _label_names(files: dict[str, bytes], member: str, kind: str) -> list[str] | None:
    """Lines of the nearest ``cfg/{kind}_label.txt`` above ``member``."""
    for parent in PurePosixPath(member).parents:
        key = (parent / "cfg" / f"{kind}_label.txt").as_posix()
        if key in files:
            return [line.strip() for line in files[key].decode("utf-8").splitlines() if line.strip()]
    return None


def _sidecar_label(files: dict[str, bytes], member: str) -> tuple[str, str]:
    """(content, style) from the .json beside a .bvh (names, or indices into the cfg label lists)."""
    key = str(PurePosixPath(member).with_suffix(".json"))
    if key not in files:
        raise ValueError(f"no labels (no {PurePosixPath(key).name} beside it and no --labels entry)")
    try:
        raw = json.loads(files[key])
        values = []
        for kind in ("content", "style"):
            value = raw[kind]
            if isinstance(value, int):
                names = _label_names(files, member, kind)
                if names is None:
                    raise ValueError(f"index {value} but no cfg/{kind}_label.txt found")
                value = names[value]
            values.append(str(value))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"bad label file {PurePosixPath(key).name} ({exc!r})") from None
    return values[0], values[1]


def _load_labels_file(path: Path | None) -> dict[str, tuple[str, str]]:
    if path is None:
        return {}
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return {str(k): (str(v["content"]), str(v["style"])) for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        expected = "{clip_id: {'content': ..., 'style': ...}}"
        raise ValueError(f"labels file {path}: expected {expected} ({exc!r})") from None


def _labelled_license(files: dict[str, bytes]) -> str:
    found = set()
    for member, data in files.items():
        if PurePosixPath(member).name.upper().startswith("LICENSE"):
            head = data[:200].decode("utf-8", errors="replace")
            found.update(name for text, name in KNOWN_LICENSES.items() if text in head)
    return ", ".join(sorted(found)) or "unknown (no recognised LICENSE file in the source; check its terms)"


def compute_normalizer(features: list[np.ndarray], skeleton: Skeleton) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Std over all frames, with HumanML3D's Std: each feature group gets its group's mean std."""
    data = np.concatenate(features, axis=0).astype(np.float64)
    mean, std = data.mean(axis=0), data.std(axis=0)
    for group in skeleton.feature_groups.values():
        std[group] = std[group].mean()
    if not (std > 0).all():
        raise ValueError("a feature group has zero variance over the train split: too little data")
    return mean.astype(np.float32), std.astype(np.float32)


def _check_paths(sources: list[Path], out: Path, force: bool) -> None:
    if not sources:
        raise ValueError("give at least one source folder or archive")
    for source in sources:
        if not source.exists():
            raise ValueError(f"source {source} does not exist")
        if not (source.is_dir() or _is_archive(source)):
            raise ValueError(f"source {source}: expected a folder or one of {', '.join(ARCHIVE_SUFFIXES)}")
    if len({s.resolve() for s in sources}) < len(sources):
        raise ValueError("the same source is given twice")
    if not out.parent.is_dir():
        raise ValueError(f"output parent folder {out.parent} does not exist; create it first")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"output {out} exists and is not empty; pass --force to replace it")


def prepare_bvh(
    source: str | Path,
    out: str | Path,
    labels: str | Path | None = None,
    joint_map: str | Path | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare one SOURCE into OUT: :func:`prepare` with a single source (the ``prepare-bvh`` command)."""
    return prepare([source], out, labels=labels, joint_map=joint_map, workers=workers, force=force,
                   progress=progress)


def prepare(
    sources: list[str | Path],
    out: str | Path,
    labels: str | Path | None = None,
    joint_map: str | Path | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare SOURCES into one dataset OUT (see the module docstring); returns the dataset.json content.

    Raises ValueError for unusable arguments (missing source, missing OUT parent, a source without clips, a bad map
    or labels file) before writing anything; single clips that fail are listed, not raised.
    """
    start = time.perf_counter()
    paths, out = [Path(s) for s in sources], Path(out)
    _check_paths(paths, out, force)
    jmap = load_map(joint_map) if joint_map is not None else None
    label_overrides = _load_labels_file(Path(labels) if labels is not None else None)
    workers = max(1, workers or os.cpu_count() or 1)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is for everyone who can read OUT's parent
    try:
        for sub in ("new_joint_vecs", "new_joints", "texts"):
            (tmp / sub).mkdir()
        files: list[dict[str, bytes]] = [{} for _ in paths]
        seen: Counter[str] = Counter()
        unread: list[ClipResult] = []  # clips whose skeleton file is missing: they never reach a worker
        clip_count = [0] * len(paths)

        def items() -> Iterator[Item]:
            for k, source in enumerate(paths):
                deferred = []
                for member, data in iter_source(source):
                    kind = clip_kind(member, data[:400])
                    if kind is None:
                        files[k][member] = data
                        continue
                    clip_count[k] += 1
                    clip_id = clip_spec(member).clip_id
                    seen[clip_id] += 1
                    if kind == "bvh":
                        yield clip_id, member, kind, data, None, k
                    else:  # needs its skeleton file, which may come later in the stream
                        deferred.append((clip_id, member, kind, data))
                if clip_count[k] == 0:
                    raise ValueError(f"source {source} holds no motion clips (.bvh, .amc, DeepMimic .txt)")
                for clip_id, member, kind, data in deferred:
                    try:
                        context = context_member(member, kind, files[k])
                    except ValueError as exc:
                        unread.append(ClipResult(clip_id, member, error=str(exc), source=k))
                        continue
                    yield clip_id, member, kind, data, files[k][context] if context else None, k

        results: list[ClipResult] = []
        bar = tqdm(desc="prepare", unit="clip", disable=not progress, file=sys.stderr)
        if workers == 1:
            previous = torch.get_num_threads()
            _init_worker(jmap, tmp)
            try:
                for item in items():
                    results.append(_prepare_clip(item))
                    bar.update()
            finally:
                torch.set_num_threads(previous)
        else:
            with mp.get_context("fork").Pool(workers, _init_worker, (jmap, tmp)) as pool:
                for result in pool.imap_unordered(_prepare_clip, items(), chunksize=4):
                    results.append(result)
                    bar.update()
        bar.close()
        results += unread
        results.sort(key=lambda r: (r.source, r.member))
        texts = [load_texts(f) for f in files]

        failures: dict[str, str] = {}
        skipped: dict[str, str] = {}
        ok: dict[str, ClipResult] = {}
        pair_of: dict[str, tuple[str, str]] = {}
        held: dict[str, bool] = {}  # clips of known layouts -> held out by their source
        manifest: dict[str, dict[str, Any]] = {}
        kept_trial = _dedup([r for r in results if r.error is None])
        duplicates = []
        for r in results:
            spec = clip_spec(r.member)
            error, skip = r.error, None
            if error is None and seen[r.clip_id] > 1:
                error = f"duplicate clip id {r.clip_id!r} (several files share this name)"
            if error is None and spec.trial is not None and kept_trial[spec.trial] != r.clip_id:
                skip = f"duplicate of CMU trial {spec.trial}: kept {kept_trial[spec.trial]} (see duplicates.why)"
            if error is None and skip is None:
                try:
                    if spec.known_layout:
                        captions, origin = clip_captions(spec, texts[r.source], CAPTIONS_PER_CLIP)
                        license_ = LICENSES[spec.source]
                    else:
                        content, style = label_overrides.get(r.clip_id) or _sidecar_label(files[r.source], r.member)
                        captions = make_captions(r.clip_id, content, style, CAPTIONS_PER_CLIP)
                        origin = f"templates from labels (content {content!r}, style {style!r})"
                        license_ = _labelled_license(files[r.source])
                except ValueError as exc:
                    if spec.known_layout:
                        skip = str(exc)
                    else:
                        error = str(exc)
            if error is not None or skip is not None:
                (failures if error is not None else skipped)[r.member] = error if error is not None else skip
                for sub in ("new_joint_vecs", "new_joints"):
                    (tmp / sub / f"{r.clip_id}.npy").unlink(missing_ok=True)
                continue
            (tmp / "texts" / f"{r.clip_id}.txt").write_text(caption_lines(captions), encoding="utf-8")
            ok[r.clip_id] = r
            if spec.known_layout:
                held[r.clip_id] = spec.held_out
            else:
                pair_of[r.clip_id] = (label_key(content), label_key(style))
            manifest[r.clip_id] = {
                "member": r.member, "input": paths[r.source].name, "source": spec.source, "license": license_,
                "captions_from": origin, "joint_map": r.joint_map, "chosen_by": (r.mapping or {}).get("chosen_by"),
                "dropped_joints": (r.mapping or {}).get("dropped", {}), "notes": list(r.notes),
                "source_frames": r.source_frames, "source_fps": r.source_fps, "frames": r.frames,
            }
        for trial, kept in sorted(kept_trial.items()):
            copies = [r.clip_id for r in results if clip_spec(r.member).trial == trial and r.error is None]
            if len(copies) > 1:
                duplicates.append({"trial": trial, "kept": kept, "dropped": [c for c in copies if c != kept]})
        for member, error in failures.items():
            print(f"prepare: failed {member}: {error}", file=sys.stderr)
        if not ok:
            first = next(iter({**failures, **skipped}.values()), "no clips")
            raise ValueError(f"no clip of {', '.join(map(str, paths))} could be prepared; first error: {first}")

        splits = make_splits(pair_of)
        for name, ids in take_splits(held).items():
            splits[name] = sorted(splits[name] + ids)
        for name in SPLIT_NAMES:
            for clip_id in splits[name]:
                manifest[clip_id]["split"] = name
        for name in SPLIT_NAMES:
            (tmp / f"{name}.txt").write_text("".join(f"{i}\n" for i in splits[name]), encoding="utf-8")
        (tmp / "all.txt").write_text("".join(f"{i}\n" for i in sorted(ok)), encoding="utf-8")
        train_features = [np.load(tmp / "new_joint_vecs" / f"{i}.npy") for i in splits["train"]]
        skeleton = jmap.skeleton if jmap is not None else SMPL22
        mean, std = compute_normalizer(train_features or [np.load(tmp / "new_joint_vecs" / f"{i}.npy") for i in ok],
                                       skeleton)
        np.save(tmp / "Mean.npy", mean)
        np.save(tmp / "Std.npy", std)

        frames = sum(r.frames for r in ok.values())
        worst = max(ok.values(), key=lambda r: r.roundtrip_error_m)
        licenses = sorted({m["license"] for m in manifest.values()})
        all_files = {m: d for f in files for m, d in f.items()}
        info = {
            "name": out.name,
            "format": "HumanML3D (new_joint_vecs (T, 263) float32, new_joints (T, 22, 3) float32, "
                      "texts/ID.txt lines 'caption#tokens#start#end')",
            "fps": skeleton.fps,
            "feature_dim": skeleton.feature_dim,
            "skeleton": skeleton.to_json(),
            "provenance": {
                "inputs": [{"name": p.name, "bytes": p.stat().st_size if p.is_file() else None,
                            "sha256": _sha256(p) if p.is_file() else None} for p in paths],
                "joint_maps": {name: load_map(name).joints for name in sorted({r.joint_map for r in ok.values()})}
                if jmap is None else {jmap.name: jmap.joints},
                "unmapped_source_joints": sorted({j for r in ok.values() for j in r.unmapped}),
                "pipeline": "clip (BVH, ASF/AMC, DeepMimic; backend.data.readers) -> joint map (--map, or by bone "
                            "names and rest geometry) -> backend.data.retarget.retarget_rotations (resample to "
                            "20 fps, metres, Y up, SMPL22 rotations over its rest, twist included) -> "
                            "backend.motion.canonicalize_rotations -> positions_to_features with the rotations; "
                            "new_joints = features_to_positions(features)",
                "rotation_channels": "local (SMPL22 parent-relative rotations over the rest pose, twist included;"
                                     " see backend.motion.rotation_channels)",
                "captions": f"{CAPTIONS_PER_CLIP} per clip: labelled clips from backend/data/caption_templates.json "
                            "seeded by clip id; CMU trials from KIT-ML captions, completed from the CMU description; "
                            "class-named clips from backend/data/class_captions.json (clips[ID].captions_from)",
                "normalizer": "Mean/Std over the train split; Std averaged within each feature group (HumanML3D)",
            },
            "license": licenses[0] if len(licenses) == 1 else "; ".join(licenses),
            "attribution": _attribution(all_files, {m["source"] for m in manifest.values()}),
            "counts": {
                "clip_files": len(results),
                "prepared": len(ok),
                "failed": len(failures),
                "skipped": len(skipped),
                "frames": frames,
                "hours": round(frames / skeleton.fps / 3600, 3),
                "source_frames": sum(r.source_frames for r in ok.values()),
                "splits": {name: len(splits[name]) for name in SPLIT_NAMES},
                "contents": dict(sorted(Counter(c for c, _ in pair_of.values()).items())),
                "styles": dict(sorted(Counter(s for _, s in pair_of.values()).items())),
                "pairs": len(set(pair_of.values())),
            },
            "sources": _source_counts(manifest, results, failures, skipped),
            "splits": {"rules": RULES, "test_unseen_pairs": held_out_pairs(pair_of, splits)},
            "checks": {
                "roundtrip_max_error_m": worst.roundtrip_error_m,
                "roundtrip_worst_clip": worst.clip_id,
                "roundtrip_tolerance_m": ROUNDTRIP_TOLERANCE_M,
            },
            "failures": [{"member": m, "error": e} for m, e in failures.items()],
            "skipped": [{"member": m, "reason": e} for m, e in skipped.items()],
            "duplicates": {"why": DEDUP_REASON, "trials": duplicates},
            "clips": manifest,
            "seconds": round(time.perf_counter() - start, 1),
            "workers": workers,
        }
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp, out)
        return info
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dedup(results: list[ClipResult]) -> dict[str, str]:
    """CMU trial -> the clip id kept among the prepared copies (:data:`DEDUP_PREFERENCE`)."""
    kept: dict[str, tuple[int, str]] = {}
    for r in results:
        spec = clip_spec(r.member)
        if spec.trial is None:
            continue
        rank = (DEDUP_PREFERENCE.index(spec.source), r.clip_id)
        if spec.trial not in kept or rank < kept[spec.trial]:
            kept[spec.trial] = rank
    return {trial: clip_id for trial, (_, clip_id) in kept.items()}


def _source_counts(manifest: dict[str, dict[str, Any]], results: list[ClipResult], failures: dict[str, str],
                   skipped: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per source: clip files, prepared, failed, skipped, frames, and prepared clips per split."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        entry = out.setdefault(clip_spec(r.member).source, {"clip_files": 0, "prepared": 0, "failed": 0,
                                                            "skipped": 0, "frames": 0, "splits": {}})
        entry["clip_files"] += 1
        entry["failed"] += r.member in failures
        entry["skipped"] += r.member in skipped
    for m in manifest.values():
        entry = out[m["source"]]
        entry["prepared"] += 1
        entry["frames"] += m["frames"]
        entry["splits"][m.get("split", "?")] = entry["splits"].get(m.get("split", "?"), 0) + 1
        entry["license"] = m["license"]
    return dict(sorted(out.items()))


def _attribution(files: dict[str, bytes], sources: set[str]) -> str:
    parts = []
    if any("Bandai-Namco-Research-Motiondataset" in m for m in files):
        parts.append("Bandai-Namco-Research-Motiondataset-1 and -2, (c) 2022 Bandai Namco Research Inc., CC BY-NC "
                     "4.0; non-commercial use only, and so is any model trained on it")
    if sources & {"cmu-cc3", "cmu-daz", "cmu-deepmimic", "cmu-dance"}:
        parts.append("The data used in this project was obtained from mocap.cs.cmu.edu. The database was created "
                     "with funding from NSF EIA-0196217.")
    if "hdm05" in sources:
        parts.append("M. Mueller, T. Roeder, M. Clausen, B. Eberhardt, B. Krueger, A. Weber: Documentation Mocap "
                     "Database HDM05, Universitaet Bonn, CG-2007-2 (research use; no commercial rights)")
    if "deepmimic" in sources:
        parts.append("DeepMimic (Peng et al. 2018) example motions, MIT-licensed repository")
    return " | ".join(parts) or "see the source's own license and attribution terms"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

