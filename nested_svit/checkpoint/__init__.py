"""Checkpoints: one reader (read, peek, unwrap, sha256), one set of layout converters, one key report,
one writer with one schema, and ``load_checkpoint`` dispatched on the model type."""
from .describe import Described, describe
from .location import LocationError, locate
from .pretrained import save_pretrained
from .loader import load_checkpoint
from .reader import Checkpoint, CheckpointError, LoadReport, read
from .writer import FileInfo, file_info, save_checkpoint

# the API (README "Checkpoints"); the other names above are the package's own modules' (imported from here)
__all__ = ["load_checkpoint", "save_checkpoint", "save_pretrained", "read", "describe", "locate", "file_info",
           "Checkpoint", "LoadReport", "FileInfo", "Described", "CheckpointError", "LocationError"]
