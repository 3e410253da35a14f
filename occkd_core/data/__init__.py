"""Prepared face data: the Arrow store every source is converted into, and the built-in synthetic faces."""

from occkd_core.data.store import (
    MAX_AGE,
    SCHEMA_VERSION,
    FaceData,
    FaceSplit,
    open_face_store,
    validate_face_data,
    write_face_store,
)
from occkd_core.data.synthetic import FaceParams, draw_faces, make_synthetic_faces, sample_face_params

__all__ = [
    "MAX_AGE", "SCHEMA_VERSION", "FaceData", "FaceParams", "FaceSplit", "draw_faces", "make_synthetic_faces",
    "open_face_store", "sample_face_params", "validate_face_data", "write_face_store",
]
