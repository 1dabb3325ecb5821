"""Reading the YAML (or JSON) mappings users write: run configs, peft configs, task files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from hyft.errors import HyftError


def read_mapping(path: str | Path, kind: str, shape: str, empty_ok: bool = True) -> dict[str, Any]:
    """The mapping in ``path``; a missing file, bad YAML or a non-mapping is a one-line HyftError naming
    ``kind`` (the file's role) or ``shape`` (what the mapping should hold). ``empty_ok``: an empty file
    is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise HyftError(f"{kind} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise HyftError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    if data is None and empty_ok:
        data = {}
    if not isinstance(data, dict):
        raise HyftError(f"{path}: {shape}")
    return data
