"""Recipes: what to compile, as YAML.

```yaml
passes:                      # ordered; each item is {pass_name: {options}}
  - my_pass: {threshold: 0.5}
capture:   {batch: 2, seq: 16, dynamic: true}
calibration: {file: calib.safetensors, samples: 16, seq_len: 32, batch_size: 8, seed: 0}
quality:   {min_cosine: 0.98, min_top1: 0.9,             # gates checked after every pass, and per
            outputs: {logits: {kl: 0.05}}}               #   output glob: Bounds as in export.parity
export:    {onnx: true, opset: 18, external_data: auto, precision: fp32,
            parity: {samples: 8, percentiles: [50, 99], tolerances: {logits: {cosine: 0.9999, p99_abs: 0.01}}}}
tags:      [{glob: "model.layers.*", tag: generation}]   # put in front of the family's defaults
entry_points: [understanding, generation_step]          # several programs from one recipe (Janus)
```

Everything is validated when the recipe is loaded, before any model is touched: unknown sections, pass
names and options, wrong types and out-of-range values each raise `RecipeError` naming the key.
Relative file paths are relative to the recipe file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sparsec.errors import RecipeError
from sparsec.transform.options import parse_section
from sparsec.data.parity import ParityOptions, Precision
from sparsec.transform.pass_manager import Pass, get_pass
from sparsec.data.quality import QualityGates
from sparsec.ir.tags import TagRule


@dataclass
class CaptureOptions:
    """Example shape used for capture; with `dynamic`, batch and sequence stay symbolic."""

    batch: int = 2
    seq: int = 16
    dynamic: bool = True

    def __post_init__(self) -> None:
        for name in ("batch", "seq"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}: must be >= 2 (torch.export specializes sizes 0 and 1), got {getattr(self, name)}")


@dataclass
class CalibrationOptions:
    """Where calibration inputs come from (see `sparsec.data.calibration`) and how they are batched."""

    file: str | None = None
    files: dict[str, str] | None = None
    samples: int = 16
    seq_len: int = 32
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class TensorRTOptions:
    """`export.tensorrt` (`--target tensorrt`, see `sparsec.exporters.targets.tensorrt`).

    `profiles`: `{dim name: [min, opt, max]}` for the ONNX's dynamic dims (`batch`, `seq`); dims not named span
    1 .. the calibration shapes parity runs. `workspace_mib`: the builder's workspace pool limit. `timing_cache`:
    a file loaded before and saved after the build (reused across compiles). `typing`: `strong` (the ONNX carries
    the precision; TensorRT 10 and 11) or `flags` (TensorRT 10 only: FP32 ONNX, FP16/BF16 builder flags).
    """

    profiles: dict[str, list[int]] = field(default_factory=dict)
    workspace_mib: int = 4096
    timing_cache: str | None = None
    typing: Literal["strong", "flags"] = "strong"

    def __post_init__(self) -> None:
        if self.workspace_mib < 1:
            raise ValueError(f"workspace_mib: must be >= 1, got {self.workspace_mib}")
        for name, bounds in self.profiles.items():
            if len(bounds) != 3 or not 0 <= bounds[0] <= bounds[1] <= bounds[2]:
                raise ValueError(f"profiles.{name}: expected [min, opt, max] with 0 <= min <= opt <= max, got {bounds}")


@dataclass
class ExportOptions:
    """Lowering: ONNX through `torch.onnx.export(dynamo=True)`, checked in ONNX Runtime.

    `moe_lowering`: MoE nodes become plain ONNX ops (`standard`, the default: any runtime, and the faster of
    the two on ONNX Runtime CPU in bench/ffn_to_moe.py) or ONNX Runtime's contrib `com.microsoft::MoE`
    (`contrib`); see `sparsec.exporters.lowering.onnx_moe`.

    `precision`: the ONNX file's compute type (`sparsec.exporters.lowering.precision`: FP16/BF16 with norms, softmax and
    the MoE router kept in FP32; inputs and outputs keep their types); `keep_fp32`: further op types to keep in
    FP32 (e.g. `[Sigmoid]`). `parity`: `sparsec.data.parity.ParityOptions`,
    whose default tolerances follow `precision`.
    """

    onnx: bool = True
    opset: int = 18
    external_data: bool | Literal["auto"] = "auto"
    moe_lowering: Literal["standard", "contrib"] = "standard"
    precision: Precision = "fp32"
    keep_fp32: list[str] = field(default_factory=list)
    parity: ParityOptions = field(default_factory=ParityOptions)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)

    def __post_init__(self) -> None:
        if not 17 <= self.opset <= 23:
            raise ValueError(f"opset: must be in [17, 23], got {self.opset}")


@dataclass
class Recipe:
    """A parsed, validated recipe. Build with `Recipe.load(path)` or `Recipe.from_dict(data)`."""

    passes: list[Pass] = field(default_factory=list)
    capture: CaptureOptions = field(default_factory=CaptureOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    quality: QualityGates = field(default_factory=QualityGates)
    export: ExportOptions = field(default_factory=ExportOptions)
    tags: list[TagRule] = field(default_factory=list)
    entry_points: list[str] = field(default_factory=list)
    source: str = "<default>"

    SECTIONS = ("passes", "capture", "calibration", "quality", "export", "tags", "entry_points")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", base_dir: Path | None = None) -> "Recipe":
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a mapping with sections {list(cls.SECTIONS)}")
        unknown = [k for k in data if k not in cls.SECTIONS]
        if unknown:
            raise RecipeError(f"{source}: unknown section(s) {unknown}; allowed: {list(cls.SECTIONS)}")
        recipe = cls(
            passes=_parse_passes(data.get("passes") or []),
            capture=parse_section(CaptureOptions, data.get("capture"), "capture"),
            calibration=parse_section(CalibrationOptions, data.get("calibration"), "calibration"),
            quality=parse_section(QualityGates, data.get("quality"), "quality"),
            export=parse_section(ExportOptions, data.get("export"), "export"),
            tags=_parse_tags(data.get("tags") or []),
            entry_points=_parse_entry_points(data.get("entry_points") or []),
            source=source,
        )
        cal = recipe.calibration
        if base_dir is not None:
            if cal.file and not Path(cal.file).is_absolute():
                cal.file = str(base_dir / cal.file)
            cal.files = {k: v if Path(v).is_absolute() else str(base_dir / v) for k, v in (cal.files or {}).items()} or None
            trt = recipe.export.tensorrt
            if trt.timing_cache and not Path(trt.timing_cache).is_absolute():
                trt.timing_cache = str(base_dir / trt.timing_cache)
        unknown = sorted(set(cal.files or {}) - set(recipe.entry_points))
        if unknown:
            raise RecipeError(f"calibration.files: entry point(s) {unknown} are not in entry_points {recipe.entry_points}")
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from exc
        return cls.from_dict(data, source=str(path), base_dir=path.parent)


def _parse_passes(items: Any) -> list[Pass]:
    if not isinstance(items, list):
        raise RecipeError("passes: expected a list of {pass_name: {options}} items")
    passes = []
    for i, item in enumerate(items):
        where = f"passes[{i}]"
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(f"{where}: expected one {{pass_name: {{options}}}} mapping, got {item!r}")
        (name, options), = item.items()
        passes.append(get_pass(name).from_recipe(options, f"{where}.{name}"))
    return passes


def _parse_entry_points(items: Any) -> list[str]:
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items) or len(set(items)) != len(items):
        raise RecipeError(f"entry_points: expected a list of distinct entry point names "
                          f"(e.g. [understanding, generation_step, vq_decode]), got {items!r}")
    return list(items)


def _parse_tags(items: Any) -> list[TagRule]:
    if not isinstance(items, list):
        raise RecipeError("tags: expected a list of {glob: ..., tag: ...} items")
    return [parse_section(TagRule, item, f"tags[{i}]") for i, item in enumerate(items)]
