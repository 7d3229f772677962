"""Recipes: what to compile, as YAML.

```yaml
passes:                      # ordered; each item is {pass_name: {options}}
  - my_pass: {threshold: 0.5}
model:     {dtype: auto, device: cpu}                 # the checkpoint's dtype; cpu or cuda[:N]
capture:   {batch: 2, seq: 16, dynamic: true}         # dynamic: false: a fixed-shape program;
                                                      #   calibration runs at its shape
calibration: {file: calib.safetensors, samples: 16, seq_len: 32, batch_size: 8, seed: 0,
              holdout: 0.2}                              # a fifth held out for the gates, never seen by a pass
quality:   {min_cosine: 0.98, min_top1: 0.9,             # gates checked after every pass (on the held-out
            max_ppl_ratio: 1.10,                         #   samples), perplexity over the dense one's (causal
            outputs: {logits: {kl: 0.05}}}               #   LMs), and per output glob: Bounds as in
                                                         #   export.parity; none: DEFAULT_GATES; {gates: off}
export:    {onnx: true, pt2: true, opset: 18, external_data: auto, precision: fp32,
            parity: {samples: 8, percentiles: [50, 99], tolerances: {logits: {cosine: 0.9999, p99_abs: 0.01}}}}
tags:      [{glob: "model.layers.*", tag: generation}]   # put in front of the family's defaults
entry_points: [understanding, generation_step]          # several programs from one recipe (Janus)
```

Everything is validated when the recipe is loaded, before any model is touched: unknown sections, pass
names and options, wrong types and out-of-range values each raise `RecipeError` naming the key.
Relative file paths are relative to the recipe file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sparsec.data.parity import ParityOptions, Precision
from sparsec.data.quality import QualityGates
from sparsec.errors import RecipeError
from sparsec.exporters.targets import Target, available_targets
from sparsec.ir.tags import TagRule
from sparsec.transform.options import parse_section
from sparsec.transform.pass_manager import Pass, get_pass


@dataclass
class CaptureOptions:
    """Example shape used for capture; with `dynamic`, batch and sequence stay symbolic."""

    batch: int = 2
    seq: int = 16
    dynamic: bool = True

    def __post_init__(self) -> None:
        for name in ("batch", "seq"):
            if getattr(self, name) < 2:
                raise ValueError(
                    f"{name}: must be >= 2 (torch.export specializes sizes 0 and 1), got {getattr(self, name)}"
                )


@dataclass
class ModelOptions:
    """How the model is loaded (`sparsec.models.load_model`): `dtype` `auto` keeps the checkpoint's own (a bf16
    checkpoint stays bf16), or `float32` / `bfloat16` / `float16`; `device` runs every PyTorch step (capture,
    statistics, quality gates, routers, adaptation, the parity reference) on `cpu` or `cuda[:N]`. The command
    line's `--dtype` / `--device` override these."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "cpu"


@dataclass
class CalibrationOptions:
    """Where calibration inputs come from (see `sparsec.data.calibration`), how they are batched and run.

    `sequential`: run the program over the calibration set block by block (`CalibrationSet.cuts` at
    `block_boundaries`) for statistics, quality gates and the parity reference, instead of batch by batch
    through the whole model; the results are the same. Off by default, and no `auto` yet: while every weight is
    in memory both hold about the same (one batch's activations, against the block-boundary values of all
    batches plus one batch's activations within a block; measured equal at 0.5B), so it pays off only once a
    block's weights are loaded for it alone, and `auto` is to be decided then from the weights that do not fit.

    `holdout`: the fraction of the calibration samples held out for the quality gates (`CalibrationSet.split`: whole
    samples, rounded to the nearest and at least one, chosen by `seed`); the passes decide on the rest and never see
    them, so the gates measure how a compression does on data it was not chosen for. In [0, 1); 0 gates on the
    samples the passes decided on. A synthetic set (no file) is split the same way; a set too small to leave a
    sample on each side is refused, naming this option.
    """

    file: str | None = None
    files: dict[str, str] | None = None
    samples: int = 16
    seq_len: int = 32
    batch_size: int = 8
    seed: int = 0
    sequential: bool = False
    holdout: float = 0.2

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(
                f"holdout: must be in [0, 1) (the fraction of calibration samples held out for the quality gates; "
                f"0 holds out none), got {self.holdout}"
            )


@dataclass
class ExportOptions:
    """Lowering: ONNX through `torch.onnx.export(dynamo=True)`, checked in ONNX Runtime.

    `pt2`: write `program.pt2` (the transformed program, `torch.export.load`-able); `false` skips it (a second
    copy of the weights on disk; `torch.export.save` writes it one tensor at a time, so memory grows by about the
    largest tensor only).

    `moe_lowering`: MoE nodes become plain ONNX ops (`standard`, the default: any runtime, and the faster of
    the two on ONNX Runtime CPU in bench/ffn_to_moe.py) or ONNX Runtime's contrib `com.microsoft::MoE`
    (`contrib`); see `sparsec.exporters.lowering.onnx_moe`.

    `precision`: the ONNX file's compute type (`sparsec.exporters.lowering.precision`: FP16/BF16 with norms, softmax and
    the MoE router kept in FP32; inputs and outputs keep their types); `keep_fp32`: further op types to keep in
    FP32 (e.g. `[Sigmoid]`). `parity`: `sparsec.data.parity.ParityOptions`,
    whose default tolerances follow `precision`.

    Target options: every registered target with an options section (`Target.section`, e.g. `tensorrt`) adds
    that key; its parsed options (the target's defaults where the recipe has none) are the attribute of that
    name, e.g. `recipe.export.tensorrt.profiles`. Build from a recipe's mapping with `ExportOptions.parse`.
    """

    onnx: bool = True
    pt2: bool = True
    opset: int = 18
    external_data: bool | Literal["auto"] = "auto"
    moe_lowering: Literal["standard", "contrib"] = "standard"
    precision: Precision = "fp32"
    keep_fp32: list[str] = field(default_factory=list)
    parity: ParityOptions = field(default_factory=ParityOptions)
    _target_options: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.onnx or self.pt2):
            raise ValueError("pt2: false with onnx: false leaves no model to write; keep one of them")
        if not 17 <= self.opset <= 23:
            raise ValueError(f"opset: must be in [17, 23], got {self.opset}")
        self._target_options = {section: target.options() for section, target in _target_sections().items()}

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("_target_options", {})
        if name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @classmethod
    def parse(cls, data: Any, base_dir: Path | None = None) -> ExportOptions:
        """The recipe's `export` mapping, target sections included; `RecipeError` naming the key otherwise.
        Path options of the target sections (`metadata={"path": True}`) are resolved relative to `base_dir`."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(f"export: expected a mapping of options, got {data!r}")
        sections = _target_sections()
        own = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = [k for k in data if k not in own and k not in sections]
        if unknown:
            raise RecipeError(f"export: unknown option(s) {unknown}; allowed: {sorted(own | set(sections))}")
        export = parse_section(cls, {k: v for k, v in data.items() if k in own}, "export")
        for section, target in sections.items():
            if section in data:
                options = parse_section(target.options, data[section], f"export.{section}")
                _resolve_paths(options, base_dir)
                export._target_options[section] = options
        return export


def _target_sections() -> dict[str, Target]:
    """The registered targets with recipe options, by their section under `export`."""
    return {t.section: t for t in available_targets().values() if t.section is not None}


def _resolve_paths(options: Any, base_dir: Path | None) -> None:
    """Make the relative path options (fields with `metadata={"path": True}`) relative to `base_dir`."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if base_dir is not None and f.metadata.get("path") and value and not Path(value).is_absolute():
            setattr(options, f.name, str(base_dir / value))


@dataclass
class Recipe:
    """A parsed, validated recipe. Build with `Recipe.load(path)` or `Recipe.from_dict(data)`."""

    passes: list[Pass] = field(default_factory=list)
    model: ModelOptions = field(default_factory=ModelOptions)
    capture: CaptureOptions = field(default_factory=CaptureOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    quality: QualityGates = field(default_factory=QualityGates.default)  # no `quality:` section: the defaults
    export: ExportOptions = field(default_factory=ExportOptions)
    tags: list[TagRule] = field(default_factory=list)
    entry_points: list[str] = field(default_factory=list)
    source: str = "<default>"

    SECTIONS = ("passes", "model", "capture", "calibration", "quality", "export", "tags", "entry_points")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", base_dir: Path | None = None) -> Recipe:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a mapping with sections {list(cls.SECTIONS)}")
        unknown = [k for k in data if k not in cls.SECTIONS]
        if unknown:
            raise RecipeError(f"{source}: unknown section(s) {unknown}; allowed: {list(cls.SECTIONS)}")
        recipe = cls(
            passes=_parse_passes(data.get("passes") or []),
            model=parse_section(ModelOptions, data.get("model"), "model"),
            capture=parse_section(CaptureOptions, data.get("capture"), "capture"),
            calibration=parse_section(CalibrationOptions, data.get("calibration"), "calibration"),
            quality=_parse_quality(data.get("quality")),
            export=ExportOptions.parse(data.get("export"), base_dir),
            tags=_parse_tags(data.get("tags") or []),
            entry_points=_parse_entry_points(data.get("entry_points") or []),
            source=source,
        )
        _fit_static_calibration(recipe, data.get("calibration") or {})
        cal = recipe.calibration
        if base_dir is not None:
            if cal.file and not Path(cal.file).is_absolute():
                cal.file = str(base_dir / cal.file)
            cal.files = {
                k: v if Path(v).is_absolute() else str(base_dir / v) for k, v in (cal.files or {}).items()
            } or None
        unknown = sorted(set(cal.files or {}) - set(recipe.entry_points))
        if unknown:
            raise RecipeError(
                f"calibration.files: entry point(s) {unknown} are not in entry_points {recipe.entry_points}"
            )
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from exc
        return cls.from_dict(data, source=str(path), base_dir=path.parent)


def _fit_static_calibration(recipe: Recipe, calibration: dict) -> None:
    """`capture.dynamic: false` captures a program that takes only the capture shape, so its calibration runs
    there: `calibration.batch_size` and `seq_len` default to `capture.batch` and `seq`; set to other values, they
    are refused. (A partial last batch is left out: `CalibrationSet.static_batch`.)"""
    if recipe.capture.dynamic:
        return
    for key, size in (("batch_size", recipe.capture.batch), ("seq_len", recipe.capture.seq)):
        given = calibration.get(key)
        if given is not None and given != size:
            shape = f"[{recipe.capture.batch}, {recipe.capture.seq}]"
            raise RecipeError(
                f"calibration.{key}: {given}, but `capture: {{dynamic: false}}` captures a program that takes only "
                f"its capture shape {shape} (capture.batch, capture.seq): leave calibration.{key} out (it then "
                f"follows the capture shape), set it to {size}, or keep the capture dynamic"
            )
        setattr(recipe.calibration, key, size)


def _parse_quality(data: Any) -> QualityGates:
    """No section (or `quality: null`): `QualityGates.default()`. A section states every gate, so one with no
    bound is refused: the one way to compile ungated is `quality: {gates: off}`."""
    if data is None:
        return QualityGates.default()
    gates = parse_section(QualityGates, data, "quality")
    if gates.gates and not gates.bounds_set():
        raise RecipeError(
            "quality: sets no bound; name the gates (min_cosine, min_top1, max_rel_l2, max_kl, max_ppl_ratio, "
            "outputs), leave the section out for the defaults, or write `quality: {gates: off}` to compile ungated"
        )
    return gates


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
        ((name, options),) = item.items()
        passes.append(get_pass(name).from_recipe(options, f"{where}.{name}"))
    return passes


def _parse_entry_points(items: Any) -> list[str]:
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items) or len(set(items)) != len(items):
        raise RecipeError(
            f"entry_points: expected a list of distinct entry point names "
            f"(e.g. [understanding, generation_step, vq_decode]), got {items!r}"
        )
    return list(items)


def _parse_tags(items: Any) -> list[TagRule]:
    if not isinstance(items, list):
        raise RecipeError("tags: expected a list of {glob: ..., tag: ...} items")
    return [parse_section(TagRule, item, f"tags[{i}]") for i, item in enumerate(items)]
