"""Training data: BVH import and retargeting, captions, splits, dataset preparation and the torch Dataset.

``python -m backend.data prepare-bvh SOURCE OUT`` builds a HumanML3D-layout dataset from BVH clips;
``python -m backend.data preview DATASET_OR_NPY ID --out FILE.gif|.png`` draws a clip.
"""
