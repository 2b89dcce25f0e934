"""FLAME layer: safe asset loading, linear blend skinning, the FLAME module and landmarks."""

from ofer.flame.flame import FLAME, front_face_indices
from ofer.flame.safe_pickle import UnsafePickleError, load_flame_model, load_landmark_embedding, load_pickle

__all__ = [
    "FLAME",
    "UnsafePickleError",
    "front_face_indices",
    "load_flame_model",
    "load_landmark_embedding",
    "load_pickle",
]
