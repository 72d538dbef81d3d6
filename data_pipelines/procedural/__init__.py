"""Procedural indoor scenes: the embedded default data source (NumPy ray casting).

``render_clip(seed, T, H, W, trajectory=..., moving_objects=...)`` returns a posed clip in the
format of ``data_pipelines/clip.py``; same seed, same bytes.
"""

from data_pipelines.procedural.clips import TRAJECTORY_KINDS, add_moving_objects, build_scene, render_clip
from data_pipelines.procedural.layout import Plan, Scene, scene_from_plan
from data_pipelines.procedural.render import render_views
from data_pipelines.procedural.trajectories import make_trajectory, states_to_poses

__all__ = ["TRAJECTORY_KINDS", "Plan", "Scene", "add_moving_objects", "build_scene",
           "make_trajectory", "render_clip", "render_views", "scene_from_plan", "states_to_poses"]
