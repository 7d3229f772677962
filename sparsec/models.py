"""Loading models: a Hugging Face `save_pretrained` directory, or a built-in tiny model.

Weights load only from safetensors (`use_safetensors=True`): a directory holding only pickled
`pytorch_model.bin` weights is refused, since unpickling runs arbitrary code; remote code is never trusted.
Built-in models (`builtin:tiny-qwen2`, ...: `builtin_names()`) come from the model families
(`sparsec.families`), built from small configs with seeded random weights: for demos, tests and the default
compile. The model class for a config lacking `architectures` comes from its family too. A directory in a layout of
a family's own (`Family.reads_directory`: BAGEL's `llm_config.json` + `ema.safetensors`) is built by that family and
loaded the same ways, every parameter from the tensor of its name (`_load_own_layout`).

Dtype: a checkpoint loads in its own dtype by default (`dtype="auto"`: a bf16 checkpoint stays bf16, never a
silent FP32 copy at twice its size); `float32`, `bfloat16`, `float16` convert. Built-in models are FP32 unless
told. Device: `cpu` (default) or `cuda[:N]`, checked before anything loads. Without weights (`weights=False`,
or a directory holding only config.json) the model is built on the meta device: its structure, parameter counts
and FLOPs are all there, nothing is read or allocated.

Lazily (`weights="lazy"`, a directory; on the CPU, `device` aside): the model is built with its parameters never allocated (CPU tensors that
are never written: capture sees the same devices, dtypes and shapes as with the weights, and its non-persistent
buffers, e.g. rotary frequencies, are computed for real) and `LoadedModel.stored` maps each parameter to its tensor
in the safetensors files (tied weights such as a shared `lm_head` / `embed_tokens` map to the one stored key).
Checkpoint tensors are found as `from_pretrained` finds them, through transformers' key conversion
(`sparsec.conversion`): legacy names (LLaVA's `language_model.model.*`, GPT-NeoX's `embed_out`) are renamed, and
experts stored one by one are fused into the model's expert tensors when read.
After capture, `LoadedModel.attach_weights(program)` backs the program by those files (`Program.attach_weights`):
a pass reads a weight when it asks for it, one at a time. `sparsec inspect` and a weight-only
`sparsec compile --dry-run` work so on a 14B model; with only config.json the program knows shapes alone.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sparsec.conversion import checkpoint_tensors
from sparsec.errors import SparsecError
from sparsec.families import (
    Family,
    available_families,
    builtin_family,
    builtin_names,
    detect_family,
    family_for_directory,
    family_for_model_type,
)
from sparsec.ir.program import Program
from sparsec.ir.stored import StoredTensor
from sparsec.resources import checkpoint_facts, checkpoint_headers

BUILTIN_PREFIX = "builtin:"


def builtin_config(name: str):
    """The config of a built-in tiny model (`tiny-qwen2`, `tiny-janus`, ...: `builtin_names()`)."""
    family = builtin_family(name)
    if name not in family.builtin_configs:
        raise SparsecError(
            f"{name} has no transformers config (a {family.name} model built directly): use "
            f"load_model('{BUILTIN_PREFIX}{name}')"
        )
    return family.builtin_configs[name]()


def build_model(config, seed: int = 0) -> torch.nn.Module:
    """A Hugging Face model for `config` with seeded random weights, in eval mode."""
    cls = _model_class(config)
    torch.manual_seed(seed)
    return cls(config).eval()


def _model_class(config) -> type[torch.nn.Module]:
    """The model class for `config`: `config.architectures`, else its family's default, as its family resolves it."""
    family = family_for_model_type(config.model_type)
    names = list(getattr(config, "architectures", None) or [])
    if not names and family.architecture:
        names = [family.architecture]
    for name in names:
        cls = family.model_class(name)
        if cls is not None:
            return cls
    raise SparsecError(
        f"cannot tell which model class to build for model_type {config.model_type!r} "
        f"(config.architectures = {names}); add the class name to config.json's `architectures`"
    )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A loaded model and where it came from.

    Attributes:
        weights: False when the model is on the meta device (structure only), "lazy" when its parameters were never
            allocated and `stored` says where each one lies (see the module docstring).
        stored: parameter name -> its tensor in the checkpoint (absent names: not in a file), for a lazy model and
            for one whose parameters were read as stored (CPU directory loads, `_read_parameters`); else empty.
    """

    model: torch.nn.Module
    family: Family
    name: str
    directory: Path | None
    weights: bool | Literal["lazy"] = True
    stored: dict[str, StoredTensor] = field(default_factory=dict)

    def attach_weights(self, program: Program) -> None:
        """Back `program` (captured from this model) by the checkpoint's files. Lazy: the program reads each weight
        from its file when asked (`Program.attach_weights`); every parameter it holds must be in the checkpoint,
        unless the directory has no weights at all (config.json only: the program then knows shapes alone),
        `SparsecError` naming the missing ones otherwise. Loaded: the weights stay in memory and the program's
        snapshots refer to their stored copies (`Program.note_stored_copies`). Nothing to do without `stored`.
        """
        parameters = {name for name, _ in self.model.named_parameters(remove_duplicate=False)}
        names = [n for n in program.state_placeholders() if n in parameters]
        if self.weights != "lazy":
            program.note_stored_copies({n: self.stored[n] for n in names if n in self.stored})
            return
        missing = [n for n in names if n not in self.stored]
        if self.stored and missing:
            unused = checkpoint_tensors(self.model, _checkpoint_index(self.directory)).unused
            raise _missing_tensors(self.directory, missing, unused)
        program.attach_weights({n: self.stored.get(n) for n in names})

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's floating-point parameters (the first one's)."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)


def parse_device(device: str | torch.device) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` as a device this machine has; `SparsecError` naming what is missing otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SparsecError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from exc
    if parsed.type not in ("cpu", "cuda"):
        raise SparsecError(f"--device {device!r}: sparsec runs on cpu or cuda[:N]")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise SparsecError(
                f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; "
                "use --device cpu, or install a CUDA build of torch on a machine with a GPU"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SparsecError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return parsed


def parse_dtype(dtype: str) -> torch.dtype | None:
    """`auto` (None: the checkpoint's own) or one of `DTYPES`; `SparsecError` otherwise."""
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise SparsecError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def hub_id_error(spec: str) -> str:
    """The error for a model that names no directory here but reads like a Hub repository id (`owner/name`): that
    sparsec reads local directories only, and how to download one; "" for any other spec."""
    parts = spec.split("/")
    if Path(spec).exists() or len(parts) != 2 or not all(parts) or spec.startswith((".", "~")):
        return ""
    return (
        f"{spec} is no directory here; it looks like a Hugging Face Hub id, and sparsec reads local directories only "
        f"(it downloads nothing): download it first (`hf download {spec} --local-dir {parts[1]}`, or "
        f"huggingface_hub.snapshot_download) and pass that directory (--model {parts[1]})"
    )


def load_model(
    spec: str | Path, *, dtype: str = "auto", device: str | torch.device = "cpu", weights: bool | Literal["lazy"] = True
) -> LoadedModel:
    """Load `builtin:NAME`, a `save_pretrained` directory (config.json + *.safetensors) or a checkpoint directory in a
    layout a family reads (BAGEL's).

    `dtype`, `device`, `weights`: see the module docstring. Bad values are refused before anything loads.

    Example:
        >>> loaded = load_model("builtin:tiny-qwen2")
        >>> loaded.family.name, loaded.dtype
        ('qwen2', torch.float32)
    """
    spec = str(spec)
    cast = parse_dtype(dtype)
    device = parse_device(device)
    if weights not in (True, False, "lazy"):
        raise SparsecError(f"weights={weights!r}: use True, False or 'lazy'")
    if spec.startswith(BUILTIN_PREFIX):
        if weights == "lazy":
            raise SparsecError(f"{spec}: a built-in model has no checkpoint to read lazily; use weights=True")
        name = spec[len(BUILTIN_PREFIX) :]
        family = builtin_family(name)
        if name in family.builtin_models:
            model = family.builtin_models[name](0)
        elif weights:
            model = build_model(builtin_config(name))
        else:
            model = _build_on_meta(_builder(builtin_config(name)))
        if weights:
            model = model.to(device=device, dtype=cast) if cast is not None else model.to(device)
        return LoadedModel(model, detect_family(model), spec, None, weights=weights)

    directory = Path(spec)
    own_layout = family_for_directory(directory)
    if own_layout is not None:
        return _load_own_layout(own_layout, directory, cast, device, weights)
    if not (directory / "config.json").is_file():
        raise SparsecError(
            hub_id_error(spec)
            or f"{directory} is not a Hugging Face model directory (no config.json); "
            f"pass a save_pretrained directory or one of {[BUILTIN_PREFIX + b for b in builtin_names()]}"
        )
    has_weights = any(directory.glob("*.safetensors"))
    if not has_weights and weights is True:
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        raise SparsecError(
            f"{directory} has no .safetensors weights"
            + (f" (only pickled {pickled}, which sparsec does not unpickle)" if pickled else "")
            + "; re-save the model with model.save_pretrained(dir, safe_serialization=True)"
        )
    import transformers

    available_families()  # family modules register their own configs with AutoConfig (sparsec.families.mot)
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise SparsecError(
            f"{directory}/config.json cannot be read as a transformers config ({exc}); restore it from the model's "
            "source or re-save it (model.config.save_pretrained(dir))"
        ) from exc
    if not weights:
        model = _build_on_meta(_builder(config), cast)
        return LoadedModel(model, detect_family(model), str(directory), directory, weights=False)
    _check_not_quantized(config, directory)
    if weights == "lazy":
        checkpoint_facts(directory)
        model = _build_unallocated(_builder(config), cast or _checkpoint_dtype(directory))
        found = checkpoint_tensors(model, _checkpoint_index(directory))
        stored = _tied(model, found.stored)
        if found.failed and any(name not in stored for name, _ in model.named_parameters()):
            raise SparsecError(
                f"{directory}: transformers converts some of its tensors as it loads them in a way sparsec cannot "
                f"plan without reading them ({'; '.join(found.failed[:2])}); load its weights into memory instead "
                "(`sparsec compile --weights memory`, or load_model(dir) in Python)"
            )
        return LoadedModel(model, detect_family(model), str(directory), directory, weights="lazy", stored=stored)
    checkpoint_facts(directory)  # a truncated or foreign .safetensors file: a clear error before loading
    if device.type == "cpu":
        read = _read_parameters(config, directory, cast or _checkpoint_dtype(directory))
        if read is not None:
            model, stored = read
            return LoadedModel(model, detect_family(model), str(directory), directory, stored=stored)
    cls = _model_class(config)
    try:
        model, info = cls.from_pretrained(
            str(directory),
            local_files_only=True,
            use_safetensors=True,
            dtype=cast if cast is not None else "auto",
            device_map=str(device) if device.type == "cuda" else None,
            output_loading_info=True,
        )
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise SparsecError(
            f"{directory}: cannot read its safetensors weights ({exc}); the files are truncated or "
            "corrupt: copy or re-save the checkpoint"
        ) from exc
    if info["missing_keys"]:  # from_pretrained would leave them randomly initialised
        unused = checkpoint_tensors(model, _checkpoint_index(directory)).unused
        raise _missing_tensors(directory, sorted(info["missing_keys"]), unused)
    return LoadedModel(model.eval(), detect_family(model), str(directory), directory)


def _check_not_quantized(config, directory: Path) -> None:
    """Refuse a quantized checkpoint (`quantization_config` in config.json: FP8, GPTQ, AWQ, bitsandbytes, ...):
    sparsec reads tensors as they are stored and has no dequantizer, so its weights would be read wrong."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    raise SparsecError(
        f"{directory}: config.json has a quantization_config (quant_method: {method or 'unknown'}); sparsec compiles "
        "unquantized weights and does not dequantize. Load the model with transformers, dequantize it "
        "(model.dequantize() where its quantizer has one) and save_pretrained it in bfloat16 or float32, then compile "
        "that directory"
    )


def _read_parameters(
    config, directory: Path, dtype: torch.dtype
) -> tuple[torch.nn.Module, dict[str, StoredTensor]] | None:
    """The model of `config` with each parameter read from the checkpoint into memory of its own, one at a time,
    and where each one lies (its exact copy: `LoadedModel.attach_weights`); None when a parameter has no tensor
    after transformers' conversion (`sparsec.conversion`; `from_pretrained` then loads it, and names what is
    missing); `SparsecError` for a tensor of another shape than its parameter. A parameter transformers fuses from
    several stored tensors is computed from them as it does.

    `from_pretrained` memory-maps each file: every parameter is a view of its file's mapping, so a weight a pass
    drops or slices stays resident (as mapped file pages) while any other tensor of that file lives, and a
    compile's peak holds the whole checkpoint to the end. Read this way, dropped and sliced weights are freed.
    Persistent buffers found in the files (which this does not load) and modules a class keeps in FP32 also leave
    it to `from_pretrained`; the result equals its load bit for bit (`tests/driver/test_load_reads.py`).
    """
    if getattr(_model_class(config), "_keep_in_fp32_modules", None):
        return None  # from_pretrained keeps those modules in FP32 whatever the dtype
    model = _build_unallocated(_builder(config), dtype)
    found = checkpoint_tensors(model, _checkpoint_index(directory))
    stored = _tied(model, found.stored)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    buffers = set(model.state_dict()) - set(parameters)
    if set(parameters) - set(stored) or buffers & found.stored.keys():
        return None
    for name, param in parameters.items():
        if stored[name].shape != tuple(param.shape):
            raise SparsecError(
                f"{stored[name].file}: tensor {stored[name].key!r} has shape {list(stored[name].shape)}, the model's "
                f"{name} is {list(param.shape)} (from config.json); the config and the weights are of different models"
            )
    return _read_into(model, stored), {name: stored[name] for name in parameters}


def _read_into(model: torch.nn.Module, stored: dict[str, StoredTensor]) -> torch.nn.Module:
    """`model` (parameters unallocated) with each parameter read from its stored tensor into memory of its own, one
    at a time, in the parameter's dtype (tied parameters read once); in eval mode."""
    read: dict[str, torch.Tensor] = {}  # stored key -> tensor
    for name, param in model.named_parameters(remove_duplicate=False):
        where = stored[name]
        if where.key not in read:
            tensor = where.read()
            if tensor.dtype != param.dtype:
                tensor = tensor.to(param.dtype)
            read[where.key] = tensor
        param.data = read[where.key]
    return model.eval()


def _load_own_layout(
    family: Family, directory: Path, cast: torch.dtype | None, device: torch.device, weights: bool | Literal["lazy"]
) -> LoadedModel:
    """A checkpoint in a layout of `family`'s own (`Family.reads_directory`: BAGEL's), loaded as `load_model` loads a
    `save_pretrained` one: in the checkpoint's dtype unless `cast`; on the meta device without `weights`; lazily
    (`weights="lazy"`); else each tensor read on its own (never the whole file mapped). Every parameter must have a
    tensor of its shape, under its name or the ones `Family.stored_names` gives (`SparsecError` naming the tensor,
    the shape expected and the config that says so); tensors the model does not use (BAGEL's VAE in
    `ae.safetensors`, the unused `gate_shared` of a MoE without shared expert) are left unread."""
    build = functools.partial(family.build_from_directory, directory)
    if not weights:
        return LoadedModel(_build_on_meta(build, cast), family, str(directory), directory, weights=False)
    checkpoint_facts(directory)  # a truncated or foreign .safetensors file: a clear error before loading
    model = _build_unallocated(build, cast or _checkpoint_dtype(directory))
    where = _checkpoint_index(directory)
    stored = _stored_tensors(model, where)
    stored |= _renamed_tensors(model, family.stored_names(model), directory, where)
    for name, param in model.named_parameters():
        found = stored.get(name)
        if found is None:
            raise SparsecError(
                f"{directory}: the checkpoint has no tensor {name!r} (expected shape {list(param.shape)}, from its "
                "config files); the checkpoint is incomplete or of another model: copy it again"
            )
        if found.shape != tuple(param.shape):
            raise SparsecError(
                f"{found.file}: tensor {name!r} has shape {list(found.shape)}, expected {list(param.shape)} (from "
                "the checkpoint's config files); the config files and the weights are of different models"
            )
    if weights == "lazy":
        return LoadedModel(model, family, str(directory), directory, weights="lazy", stored=stored)
    model = _read_into(model, stored).to(device)
    return LoadedModel(model, family, str(directory), directory, stored=stored if device.type == "cpu" else {})


def _renamed_tensors(
    model: torch.nn.Module,
    names: dict[str, str | tuple[str, ...]],
    directory: Path,
    where: dict[str, tuple[Path, tuple[int, ...]]],
) -> dict[str, StoredTensor]:
    """The stored tensors of the parameters `names` maps (`Family.stored_names`): renamed, or stacked from parts in
    one file; `SparsecError` naming a missing or misshapen tensor and the shape expected."""
    parameters = dict(model.named_parameters())
    stored = {}
    for name, keys in names.items():
        param = parameters[name]
        parts, expected = ((keys,), tuple(param.shape)) if isinstance(keys, str) else (keys, tuple(param.shape[1:]))
        for key in parts:
            if key not in where:
                raise SparsecError(
                    f"{directory}: the checkpoint has no tensor {key!r} (expected shape {list(expected)}, from its "
                    "config files); the checkpoint is incomplete or of another model: copy it again"
                )
            if where[key][1] != expected:
                raise SparsecError(
                    f"{where[key][0]}: tensor {key!r} has shape {list(where[key][1])}, expected {list(expected)} "
                    "(from the checkpoint's config files); the config files and the weights are of different models"
                )
        files = {where[key][0] for key in parts}
        if len(files) > 1:
            raise SparsecError(
                f"{directory}: the tensors {parts[0]!r} .. {parts[-1]!r} lie in {sorted(f.name for f in files)}; "
                "sparsec stacks the parts of one weight from one file: re-save the checkpoint as one file"
            )
        if isinstance(keys, str):
            stored[name] = StoredTensor(files.pop(), keys, expected, param.dtype)
        else:
            key = f"{parts[0]} .. {parts[-1]} (stacked)"
            stored[name] = StoredTensor(files.pop(), key, (len(parts), *expected), param.dtype, parts=parts)
    return stored


def _builder(config) -> Callable[[], torch.nn.Module]:
    """Builds the model of `config` (its class: `_model_class`) when called."""
    cls = _model_class(config)
    return lambda: cls(config)


def _build_on_meta(build: Callable[[], torch.nn.Module], dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model `build` makes, on the meta device: every shape, no memory, no weights read."""
    with torch.device("meta"):
        model = build() if dtype is None else build().to(dtype)
    return model.eval()


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _checkpoint_dtype(directory: Path) -> torch.dtype:
    """The floating-point dtype holding most of the checkpoint's bytes (float32 without weights)."""
    _, by_dtype = checkpoint_facts(directory)
    floating = {d: n for d, n in by_dtype.items() if d in _SAFETENSORS_DTYPES}
    return _SAFETENSORS_DTYPES[max(floating, key=floating.get)] if floating else torch.float32


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters registered in this block go to the meta device (their initialisation writes nothing); buffers
    and everything else are built for real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":  # a meta one is kept: tying shares the object
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _build_unallocated(build: Callable[[], torch.nn.Module], dtype: torch.dtype) -> torch.nn.Module:
    """The model `build` makes, in `dtype`, with CPU parameters that are never written (`torch.empty`: no page is
    touched, so nothing is resident) and real buffers; tied parameters stay one tensor."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained builds: buffers keep the dtypes the model code gives them
    try:
        with _parameters_on_meta():
            model = build()
    finally:
        torch.set_default_dtype(default)
    empty: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                if id(param) not in empty:
                    empty[id(param)] = torch.nn.Parameter(
                        torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad
                    )
                module._parameters[name] = empty[id(param)]
    return model.eval()


def _checkpoint_index(directory: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Stored key -> (file, shape) of every tensor in the directory's safetensors files, from the headers only
    (checked against the files: `sparsec.resources.checkpoint_headers`)."""
    return {
        key: (path, tuple(info["shape"]))
        for path, header in checkpoint_headers(directory).items()
        for key, info in header.items()
    }


def _stored_tensors(model: torch.nn.Module, where: dict[str, tuple[Path, tuple[int, ...]]]) -> dict[str, StoredTensor]:
    """Parameter name -> its tensor in the safetensors files `where` indexes, by name alone: for a
    checkpoint in a family's own layout, whose names are the model's (a `save_pretrained` one goes through
    transformers' conversion: `sparsec.conversion`).

    A name is looked up as is, then with the model's `base_model_prefix` removed or added (a checkpoint of the
    bare base model); tied parameters (one tensor under several names) share whichever of their names is stored.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: dict[str, StoredTensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        candidates = [name, name.removeprefix(prefix + "."), f"{prefix}.{name}"] if prefix else [name]
        key = next((c for c in candidates if c in where), None)
        if key is not None:
            found[name] = StoredTensor(where[key][0], key, where[key][1], param.dtype)
    return _tied(model, found)


def _tied(model: torch.nn.Module, found: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    """Parameter name -> its stored tensor, of the names in `found` (state names, buffers among them): tied
    parameters (one tensor under several names) all map to the tensor of the first of their names found."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    stored: dict[str, StoredTensor] = {}
    for names in aliases.values():
        tensor = next((found[n] for n in names if n in found), None)
        if tensor is not None:
            stored |= dict.fromkeys(names, tensor)
    return stored


def _missing_tensors(directory: Path, missing: list[str], unused: dict[str, str]) -> SparsecError:
    """The error for parameters the checkpoint in `directory` has no tensor for, after transformers' conversion:
    their number, a few of them and, for each, the unused stored tensor whose converted name (`unused`: converted
    name -> stored key) is closest."""
    shown = []
    for name in missing[:3]:
        close = difflib.get_close_matches(name, list(unused), n=1, cutoff=0.5)
        shown.append(f"{name!r} (closest unused stored tensor: {unused[close[0]]!r})" if close else repr(name))
    return SparsecError(
        f"{directory}: the checkpoint has no tensor for {len(missing)} parameter(s), under its name or one "
        f"transformers converts from: {', '.join(shown)}{', ...' if len(missing) > 3 else ''}; "
        + ("" if unused else "it stores no tensor the model does not use; ")
        + "the checkpoint is incomplete or of another model than its config.json describes: copy it again or "
        "re-save the model"
    )
