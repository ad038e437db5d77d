"""Checkpoints: one reader (read, peek, unwrap, sha256), one set of layout converters, one key report,
one writer with one schema, and ``load_checkpoint`` dispatched on the model type."""
from .convert import BLOCK_EPS, convert, detect_format
from .describe import Described, describe
from .keys import check_keys, key_listing
from .location import LocationError, locate
from .pretrained import pretrained_config, save_pretrained
from .loader import classifier_from_file, load_checkpoint, models_like, release_model
from .reader import Checkpoint, CheckpointError, LoadReport, peek, read, read_file, sha256_of, unwrap
from .writer import (FileInfo, checkpoint_payload, file_info, model_payload, save_checkpoint, save_payload,
                     write_checkpoint)

__all__ = ["describe", "Described", "locate", "LocationError", "save_pretrained", "pretrained_config", "load_checkpoint", "classifier_from_file", "release_model", "models_like", "CheckpointError", "LoadReport", "Checkpoint", "read",
           "read_file", "peek", "unwrap", "sha256_of", "detect_format", "convert", "BLOCK_EPS", "check_keys",
           "key_listing", "FileInfo", "file_info", "checkpoint_payload", "model_payload", "save_checkpoint",
           "save_payload", "write_checkpoint"]
