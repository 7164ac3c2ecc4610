"""The commands' files: user errors as one line, the user's model, output paths checked before any work."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orprune.network.saving import FORMAT
from orprune.network.saving import load as load_saved

__all__ = ["UsageError", "check_input_file", "check_output_file", "import_user_module", "load_model"]

_SCRIPT_HINT = ("torch.save(model) stores the class by name, so loading needs its definition: pass "
                "--model-module FILE.py (or a module name) where the class is defined (its top-level code runs: keep "
                "training code under `if __name__ == \"__main__\":`), or save with orprune.save(model, path)")


class UsageError(Exception):
    """A mistake in the command line or the user's files: reported as one line, exit status 2."""


def check_input_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {path} does not exist")
    if p.is_dir():
        raise UsageError(f"{what} {path} is a directory, not a file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{what} {path} is not readable")
    return p


def check_output_file(path: str, what: str) -> Path:
    """Fail now rather than after the whole run: the folder must exist and be writable."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UsageError(f"{what} {path} is a directory; give a file name")
    if not folder.is_dir():
        raise UsageError(f"{what} {path}: folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{what} {path} is not writable")
    return p


def import_user_module(spec: str) -> types.ModuleType:
    """A module by name (``mypackage.models``) or by file (``train.py``; imported under its stem, not as
    ``__main__``, so its ``if __name__ == "__main__":`` block does not run)."""
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec).resolve()
            if not path.is_file():
                raise UsageError(f"module file {spec} does not exist")
            sys.path.insert(0, str(path.parent))  # its own imports of neighbouring files
            name = path.stem if path.stem not in sys.modules else f"_orprune_user_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
            return module
        return importlib.import_module(spec)
    except UsageError:
        raise
    except ModuleNotFoundError as exc:
        raise UsageError(f"cannot import {spec}: {exc}") from exc
    except Exception as exc:
        raise UsageError(f"importing {spec} failed: {type(exc).__name__}: {exc}") from exc


def _pickle_with(main: types.ModuleType) -> types.ModuleType:
    """``pickle`` whose unpickler finds the classes of ``__main__`` (the user's script) in ``main``."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "__main__":
                module = main.__name__
            return super().find_class(module, name)

    namespace = types.ModuleType("orprune_user_pickle")
    namespace.__dict__.update({k: v for k, v in vars(pickle).items() if not k.startswith("__")})
    namespace.Unpickler = Unpickler
    return namespace


def _load_saved(path: Path, data: dict, user: types.ModuleType | None) -> nn.Module:
    module_name, _, qualname = str(data.get("class", "")).partition(":")
    try:
        template = None
        if user is not None and module_name in ("__main__", user.__name__):
            template = user
            for part in qualname.split("."):
                template = getattr(template, part)
            template = template()
        return load_saved(path, template)
    except Exception as exc:
        raise UsageError(f"{path} is an orprune.save file of {module_name}:{qualname}, which cannot be rebuilt here "
                         f"({exc}); pass --model-module FILE.py defining {qualname} (constructible without "
                         "arguments), or load it in Python with orprune.load(path, YourModel())") from exc


def load_model(path: str, model_module: str | None = None) -> tuple[nn.Module, Path]:
    """The whole module saved at ``path`` (``torch.save(model)`` or :func:`orprune.save`), with errors the
    user can act on."""
    p = check_input_file(path, "model file")
    user = import_user_module(model_module) if model_module else None
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:
        data = None  # a pickled module (or not a torch file): below
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return _load_saved(p, data, user), p
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False,
                         pickle_module=_pickle_with(user) if user is not None else pickle)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        found = re.search(r"Can't get attribute '([^']+)' on <module '([^']+)'", str(exc))
        what = (f"class {found.group(1)} is not in {'the script that saved it' if user is None else model_module}"
                if found else str(exc))
        raise UsageError(f"{path}: cannot load the model: its {what}; {_SCRIPT_HINT}") from exc
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError, UnicodeDecodeError,
            OSError) as exc:
        reason = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{path} is not a file written by torch.save, or it is truncated ({reason})") from exc
    if isinstance(obj, dict):
        raise UsageError(f"{path} holds a dict (a state dict?), not a whole model: save it with "
                         "torch.save(model, path) or orprune.save(model, path)")
    if not isinstance(obj, nn.Module):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj.eval(), p
