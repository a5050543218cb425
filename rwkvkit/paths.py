"""Where a user-given file is: ``~`` expanded, ``pkg://package/name`` for a file shipped inside an
installed package, and for models a config name (``demo``, ``world_0.1b``) standing for the
``path`` of that packaged model config, so every place that takes a model path takes all three.

Kept free of heavy imports: rwkvkit.checkpoint and rwkvkit.resolve both build on it.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

PACKAGE_SCHEME = "pkg://"
SUFFIXES = (".pth", ".safetensors")  # checkpoint suffixes tried after the path as given
_CONFIG_NAME = re.compile(r"[\w.\-]+")


def resolve_file(path: str | Path) -> Path:
    """A user-given path; ``pkg://package/name`` is a file shipped inside an installed package."""
    text = str(path)
    if text.startswith(PACKAGE_SCHEME):
        package, _, name = text[len(PACKAGE_SCHEME) :].partition("/")
        return Path(str(resources.files(package).joinpath(name)))
    return Path(text).expanduser()


def candidates(path: Path) -> list[Path]:
    """The files a checkpoint path may mean: as given, else with ``.pth`` or ``.safetensors``."""
    return [path] + [path.with_name(path.name + s) for s in SUFFIXES if not path.name.endswith(s)]


def model_config_path(name: str) -> str | None:
    """The ``path`` of the packaged model config ``conf/model/NAME.yaml``, its interpolations
    (``${oc.env:RWKV_MODELS,'~/models'}``) resolved; None when there is no such config."""
    if not _CONFIG_NAME.fullmatch(name):
        return None
    config = resources.files("rwkvkit.conf").joinpath("model", f"{name}.yaml")
    if not config.is_file():
        return None
    from omegaconf import OmegaConf

    return str(OmegaConf.create(config.read_text(encoding="utf-8")).path)


def model_file(name: str | Path) -> Path:
    """A model path as given (``pkg://`` and ``~`` resolved); a model config name when no such
    file exists stands for its config's path."""
    path = resolve_file(name)
    configured = None if any(c.exists() for c in candidates(path)) else model_config_path(str(name))
    return path if configured is None else resolve_file(configured)
