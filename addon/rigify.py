"""Generated Rigify rigs: which controls an animator keys for each canonical joint, and the switches to set.

A generated rig's DEF- bones follow its ORG- bones, which follow the FK or IK controls through constraints, so
keys on DEF-/ORG- bones have no visible effect. The retargeter reads the rest geometry from the ORG- bones (the
metarig's anatomy) and keys the FK controls: the spine_fk chain (Rigify's hips half hangs downwards from the
torso pivot at spine.002's head), neck, head, shoulders and the arm and leg FK chains; "torso" carries the root
location. The switches put every limb in FK, make the FK limbs, neck and head follow their parents, so each
control turns with the control above it as in a plain hierarchy. Measured on Rigify as shipped with Blender 5.0
(`bpy.ops.pose.rigify_generate()` of the human metarig).
"""

from __future__ import annotations

from collections.abc import Iterable

GEOMETRY_PREFIX = "ORG-"  # + the metarig's bone name: the bone whose rest pose says where a joint is
ROOT_CONTROL = "torso"  # keyed with the root location; it carries everything else
ANCHOR_JOINT = "spine2"  # the joint at the torso's pivot (spine.002's head), which only the torso moves
STILL_CONTROLS = ("torso", "hips", "chest")  # keyed at rest so that a pose left on them does not add up

_SPINE = {"pelvis": "spine_fk", "spine1": "spine_fk.001", "spine2": "spine_fk.002", "spine3": "spine_fk.003",
          "neck": "neck", "head": "head"}  # fmt: skip
_LIMBS = {"hip": "thigh_fk", "knee": "shin_fk", "ankle": "foot_fk", "foot": "toe_fk", "collar": "shoulder",
          "shoulder": "upper_arm_fk", "elbow": "forearm_fk", "wrist": "hand_fk"}  # fmt: skip
# canonical joint -> FK control
CONTROLS = {**_SPINE, **{f"{side}_{joint}": f"{bone}.{s}" for joint, bone in _LIMBS.items()
                         for side, s in (("left", "L"), ("right", "R"))}}  # fmt: skip


def switches(bone_names: Iterable[str]) -> dict[str, float]:
    """Custom-property settings (data path -> value) that make the rig's FK controls drive it as a hierarchy.

    IK_FK = 1 is FK (the ORG bones copy the IK chain with influence 1 - IK_FK); FK_limb_follow = 0 keeps an FK
    limb turning with the body; neck_follow = head_follow = 1 make the neck follow the chest and the head the neck
    (at 0 Rigify holds them level in the world).
    """
    names = set(bone_names)
    out: dict[str, float] = {}
    for limb in ("upper_arm_parent", "thigh_parent"):
        for s in ("L", "R"):
            if f"{limb}.{s}" in names:
                out[f'pose.bones["{limb}.{s}"]["IK_FK"]'] = 1.0
                out[f'pose.bones["{limb}.{s}"]["FK_limb_follow"]'] = 0.0
    if ROOT_CONTROL in names:
        out[f'pose.bones["{ROOT_CONTROL}"]["neck_follow"]'] = 1.0
        out[f'pose.bones["{ROOT_CONTROL}"]["head_follow"]'] = 1.0
    return out
