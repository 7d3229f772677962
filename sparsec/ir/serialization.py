"""Serialization: a program as a `.pt2` file that plain `torch.export.load` reads, and back.

Contract: `save` writes the exported program with sparsec's metadata (`ProgramMetadata`) in an extra file, staged
beside the target and renamed into place (nothing half-written). The file needs only torch to load and run: a
program's outputs are plain containers (`with_plain_outputs`, applied whenever a `Program` is made, so what passes
see is what the file holds), unless the graph holds sparsec's own operators (`torch.ops.sparsec.moe`), which
`import sparsec` registers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from sparsec.ir.tags import Tagger

_METADATA_FILE = "sparsec.json"
_PLAIN_CONTAINERS = (tuple, list, dict)


@dataclass(frozen=True)
class ProgramMetadata:
    """What a `Program` knows beyond its `ExportedProgram` (see `Program`'s attributes)."""

    family: str
    tagger: Tagger
    dynamic_dims: dict[str, dict[int, str]]
    dim_bounds: dict[str, int]


def save(exported: ExportedProgram, metadata: ProgramMetadata, path: str | os.PathLike) -> Path:
    """Write `exported` with `metadata` to `path` (see the module docstring); returns the path."""
    path = Path(path)
    meta = {
        "family": metadata.family,
        "tags": metadata.tagger.to_list(),
        "dynamic_dims": metadata.dynamic_dims,
        "dim_bounds": metadata.dim_bounds,
    }
    stage = tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)  # the archive is named after the file
    try:
        torch.export.save(exported, os.path.join(stage, path.name), extra_files={_METADATA_FILE: json.dumps(meta)})
        os.replace(os.path.join(stage, path.name), path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return path


def load(path: str | os.PathLike) -> tuple[ExportedProgram, ProgramMetadata]:
    """The exported program `save` wrote to `path` and its metadata (defaults for a `.pt2` file sparsec did not
    write)."""
    extra = {_METADATA_FILE: ""}
    exported = torch.export.load(path, extra_files=extra)
    meta = json.loads(extra[_METADATA_FILE] or "{}")
    dims = {k: {int(a): n for a, n in v.items()} for k, v in meta.get("dynamic_dims", {}).items()}
    metadata = ProgramMetadata(
        family=meta.get("family", "unknown"),
        tagger=Tagger.from_list(meta.get("tags", [])),
        dynamic_dims=dims,
        dim_bounds=meta.get("dim_bounds", {}),
    )
    return exported, metadata


def plain_spec(spec: Any) -> Any:
    """`spec` with every node that is not a tuple, list or dict (a Hugging Face `ModelOutput`, a namedtuple, an
    OrderedDict, any class registered with pytree) made a dict of the same keys, or a tuple where it has none.

    torch.export serializes such nodes by their class name and its loader must find that class registered with
    pytree: a program returning `CausalLMOutputWithPast` does not load without transformers imported.
    """
    if spec.is_leaf():
        return spec
    children = [plain_spec(child) for child in spec.children()]
    if spec.type in _PLAIN_CONTAINERS:
        return torch.utils._pytree.TreeSpec(spec.type, spec.context, children)
    context = getattr(spec.context, "_fields", spec.context)  # a namedtuple's spec holds its class
    if isinstance(context, (list, tuple)) and len(context) == len(children):
        return torch.utils._pytree.TreeSpec(dict, [str(k) for k in context], children)
    return torch.utils._pytree.TreeSpec(tuple, None, children)


def with_plain_outputs(exported: ExportedProgram) -> None:
    """Make the program's output structure plain containers (`plain_spec`), in place; the leaves keep their names."""
    calls = exported.module_call_graph
    for i, entry in enumerate(calls):
        spec = entry.signature.out_spec if entry.signature is not None else None
        if spec is not None:
            calls[i] = dataclasses.replace(
                entry, signature=dataclasses.replace(entry.signature, out_spec=plain_spec(spec))
            )
