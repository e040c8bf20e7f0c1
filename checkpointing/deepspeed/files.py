"""Read a checkpoint written by DeepSpeed's `engine.save_checkpoint` (ZeRO 1/2/3) or by its
offline `ds_to_universal`, as full fp32 tensors per parameter: weights, Adam exp_avg and
exp_avg_sq, the step and the parameter group's hyperparameters.

Where the pieces are comes from DeepSpeed's own records:

    ZeRO-1/2  `param_slice_mappings[group][name]` = (start, numel) of the parameter's fragment
              in rank r's flat fp32 partition; a parameter's fragments in rank order are the
              whole parameter (what DeepSpeed's hp fragment mapping links at runtime).
    ZeRO-3    every parameter is split in world-size pieces of ceil(numel / world) elements,
              laid out in `param_shapes` order in each rank's `fp32_flat_groups` (the rule of
              zero_to_fp32 and ds_to_universal; ZeRO-3 files record no slice mapping).
    universal `zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`, whole tensors.

Files are read with `torch.load(weights_only=True)`. DeepSpeed's few plain record classes
(loss scaler, stage enum, fragment address) are allow-listed under their DeepSpeed names but
built as inert stand-ins here, so importing needs no `import deepspeed` (nor DeepSpeed installed)
and unpickling runs none of its code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

STATES = ("fp32", "exp_avg", "exp_avg_sq")


@dataclass
class DeepSpeedState:
    step: int
    params: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """name -> {"fp32", "exp_avg", "exp_avg_sq"} full tensors of the parameter's shape."""
    steps: dict[str, float] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    """name -> its optimizer group's hyperparameters (absent for universal folders)."""
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    kind: str = ""


class DeepSpeedRecord:
    """Holds a pickled DeepSpeed object's attributes (a fragment address's `start`/`numel`, a
    loss scaler's fields); defines no behaviour, so unpickling one runs no code."""


class ZeroStage(int):
    """DeepSpeed's `ZeroStageEnum` member, as its integer value."""

    @property
    def value(self) -> int:
        return int(self)


class LossScaler(DeepSpeedRecord):
    pass


class DynamicLossScaler(DeepSpeedRecord):
    pass


class FragmentAddress(DeepSpeedRecord):
    pass


STAND_INS = [
    (LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (DynamicLossScaler, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (FragmentAddress, "deepspeed.utils.tensor_fragment.fragment_address"),
]


def load_pt(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(STAND_INS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
        reason = str(err).splitlines()[0]
        raise ValueError(f"{path}: not a readable DeepSpeed file: {reason}") from None


def is_universal_dir(path: Path) -> bool:
    return any(Path(path).glob("zero/*/fp32.pt"))


def find_step_dir(path: Path) -> Path:
    """The tag folder holding *_model_states.pt: `path` itself, the tag `latest` names, or the
    newest global_step*."""
    path = Path(path)
    if any(path.glob("*model_states.pt")):
        return path
    latest = path / "latest"
    if latest.is_file() and (path / latest.read_text().strip()).is_dir():
        return path / latest.read_text().strip()
    steps = sorted(path.glob("global_step*"), key=lambda p: int("0" + p.name[11:]))
    if not steps:
        raise ValueError(f"{path}: no DeepSpeed checkpoint (*_model_states.pt) found")
    return steps[-1]


def read_deepspeed(path: Path) -> DeepSpeedState:
    """A DeepSpeed save directory (or one tag folder of it), or a ds_to_universal folder."""
    if is_universal_dir(path):
        return read_universal(Path(path))
    step_dir = find_step_dir(path)
    optim_files = sorted(step_dir.glob("*zero_pp_rank_*_optim_states.pt"), key=_rank_of)
    if not optim_files:
        raise ValueError(f"{step_dir}: no *zero_pp_rank_*_optim_states.pt (not a ZeRO checkpoint)")
    model_states = load_pt(sorted(step_dir.glob("*model_states.pt"))[0])
    if model_states.get("frozen_param_shapes"):
        raise ValueError(f"{step_dir}: frozen parameters are not supported by the import")
    optims = [load_pt(f)["optimizer_state_dict"] for f in optim_files]
    stage = int(getattr(optims[0]["zero_stage"], "value", optims[0]["zero_stage"]))
    state = DeepSpeedState(step=int(model_states.get("global_steps", 0)), kind=f"zero{stage}")
    if stage == 3:
        _read_zero3(optims, model_states["param_shapes"], state, step_dir)
    elif stage in (1, 2):
        _read_zero12(optims, model_states["param_shapes"], state, step_dir)
    else:
        raise ValueError(f"{step_dir}: ZeRO stage {stage} is not importable (1, 2 or 3)")
    module = model_states.get("module") or {}
    state.buffers = {n: module[n].clone() for n in model_states.get("buffer_names", [])}
    for alias, source in (model_states.get("shared_params") or {}).items():
        state.params[alias] = state.params[source]
        state.steps[alias], state.groups[alias] = state.steps[source], state.groups[source]
    return state


def _read_zero12(optims: list[dict], param_shapes: list[dict], state: DeepSpeedState,
                 step_dir: Path) -> None:
    for group, shapes in enumerate(param_shapes):
        flats = [o["single_partition_of_fp32_groups"][group] for o in optims]
        adam = [o["base_optimizer_state"]["state"][group] for o in optims]
        hyper = _hyperparameters(optims[0]["base_optimizer_state"]["param_groups"][group])
        for name, shape in shapes.items():
            pieces: dict[str, list[torch.Tensor]] = {key: [] for key in STATES}
            for rank, optim in enumerate(optims):
                address = optim["param_slice_mappings"][group].get(name)
                if address is None:
                    continue
                for key, flat in zip(STATES, (flats[rank], adam[rank]["exp_avg"],
                                              adam[rank]["exp_avg_sq"])):
                    pieces[key].append(flat.narrow(0, address.start, address.numel))
            _store(state, name, tuple(shape), pieces, step_dir)
            state.steps[name] = float(adam[0]["step"])
            state.groups[name] = hyper


def _read_zero3(optims: list[dict], param_shapes: list[dict], state: DeepSpeedState,
                step_dir: Path) -> None:
    world = len(optims)
    inner = [o["optimizer_state_dict"] for o in optims]
    sub_sizes = [flat.numel() for flat in optims[0]["fp32_flat_groups"]]
    flats = {
        "fp32": [torch.cat(list(o["fp32_flat_groups"])) for o in optims],
        **{key: [torch.cat([s["state"][i][key] for i in range(len(sub_sizes))]) for s in inner]
           for key in ("exp_avg", "exp_avg_sq")},
    }
    offset = 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            pieces = {key: [f.narrow(0, offset, part) for f in flats[key]] for key in STATES}
            sub = _sub_group_at(sub_sizes, offset)
            _store(state, name, tuple(shape), pieces, step_dir, trim=numel)
            state.steps[name] = float(inner[0]["state"][sub]["step"])
            state.groups[name] = _hyperparameters(inner[0]["param_groups"][sub])
            offset += part


def read_universal(path: Path) -> DeepSpeedState:
    state = DeepSpeedState(step=0, kind="universal")
    shapes = _universal_shapes(path)
    for folder in sorted(p for p in (path / "zero").iterdir() if (p / "fp32.pt").is_file()):
        name = folder.name
        pieces = {}
        for key in STATES:
            value = load_pt(folder / f"{key}.pt")
            pieces[key] = [value["param"] if isinstance(value, dict) else value]
        shape = tuple(pieces["fp32"][0].shape)
        if len(shape) == 1 and name in shapes:
            shape = shapes[name]
        _store(state, name, shape, {k: [v[0].flatten()] for k, v in pieces.items()}, folder)
        step = folder / "step.pt"
        state.steps[name] = float(load_pt(step)) if step.is_file() else 0.0
        state.step = max(state.step, int(state.steps[name]))
    return state


def _universal_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes from a model_states file beside the folder or in its source tag folder
    (ZeRO-3 universal tensors are stored flat)."""
    for folder in (path, path.parent / path.name.removesuffix("_universal")):
        files = sorted(folder.glob("*model_states.pt")) if folder.is_dir() else []
        if files:
            groups = load_pt(files[0])["param_shapes"]
            return {n: tuple(s) for g in groups for n, s in g.items()}
    return {}


def _store(state: DeepSpeedState, name: str, shape: tuple[int, ...],
           pieces: dict[str, list[torch.Tensor]], where: Path, trim: int | None = None) -> None:
    numel = math.prod(shape)
    full = {}
    for key, parts in pieces.items():
        flat = torch.cat(parts) if parts else torch.empty(0)
        flat = flat[:trim] if trim is not None else flat
        if flat.numel() != numel:
            raise ValueError(f"{where}: {name} {key}: fragments hold {flat.numel()} elements, "
                             f"shape {list(shape)} needs {numel}")
        full[key] = flat.view(shape)
    state.params[name] = full


def _sub_group_at(sizes: list[int], offset: int) -> int:
    for index, end in enumerate(torch.tensor(sizes).cumsum(0).tolist()):
        if offset < end:
            return index
    return len(sizes) - 1


def _hyperparameters(group: dict) -> dict[str, Any]:
    """The group's entries but its parameter list (the importer makes them JSON)."""
    return {k: v for k, v in group.items() if k != "params"}


def _rank_of(path: Path) -> int:
    return int(path.name.split("zero_pp_rank_")[1].split("_")[0])
