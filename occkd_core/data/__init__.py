"""Prepared face data: the Arrow store every source is converted into, and the built-in synthetic faces."""

from occkd_core.data.store import (
    MAX_AGE,
    SCHEMA_VERSION,
    FaceData,
    FaceSplit,
    open_face_store,
    store_summary,
    validate_face_data,
    write_face_store,
)
from occkd_core.data.synthetic import FaceParams, draw_faces, make_synthetic_faces, sample_face_params

__all__ = [
    "MAX_AGE", "SCHEMA_VERSION", "FaceData", "FaceParams", "FaceSplit", "draw_faces", "make_synthetic_faces",
    "open_face_store", "sample_face_params", "store_summary", "validate_face_data", "write_face_store",
]

# Real data sets, read from their original files (FER+, AffectNet, UTKFace), and their cached conversion.
from occkd_core.data.affectnet import load_affectnet
from occkd_core.data.ferplus import load_ferplus
from occkd_core.data.sources import REAL_TASK_SOURCES, find_sources, prepare_real_data
from occkd_core.data.utkface import load_utkface

__all__ += ["REAL_TASK_SOURCES", "find_sources", "load_affectnet", "load_ferplus", "load_utkface", "prepare_real_data"]
