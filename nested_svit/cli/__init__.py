"""nested-svit command line: ``common`` at the bottom (outputs, devices, progress, checks), ``options``
and ``arguments`` (option groups per model family), ``models`` and ``jobs`` (what the jobs build), one
module per job (``predict``, ``evaluate``, ``train``, ``bench``, ``listing``), ``main`` on top."""
from .main import build_parser, main

__all__ = ["main", "build_parser"]
