"""Text loading, tokenisation and fixed-length windows for calibration, evaluation and training."""

from leanformers.data.text import (
    calibration_windows,
    check_sources,
    evaluation_windows,
    load_text,
    mixed_calibration_windows,
    parse_sources,
    shared_data_path,
    tokenize_text,
)

__all__ = [
    "calibration_windows",
    "check_sources",
    "evaluation_windows",
    "load_text",
    "mixed_calibration_windows",
    "parse_sources",
    "shared_data_path",
    "tokenize_text",
]
