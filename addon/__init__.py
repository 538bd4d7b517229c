"""Motion Mamba Blender extension (bpy is imported only inside register() and submodules)."""
