"""The parallel plan: what runs where, and its JSON (`autopar.plan/v1`, validated both ways)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA_ID = "autopar.plan/v1"


class PlanError(ValueError):
    """A plan file is malformed, or a plan is inconsistent with its model or cluster."""


@dataclass
class StagePlan:
    index: int
    layers: tuple[int, int]                  # [start, end) into the model's layers
    layer_names: list[str]
    submesh: tuple[int, int]                 # (nodes, gpus per node)
    device_ids: list[int]                    # global device ids, row-major over the logical mesh
    logical_mesh: tuple[int, int]
    strategies: dict[str, str]               # decision op -> strategy name
    input_spec: str = ""                     # layout of the stage's input boundary tensor
    recompute: str = "none"                  # none | selective | full
    # filled by the evaluator
    ops: list[dict] = field(default_factory=list)
    t_intra_s: float = 0.0                   # forward + backward per microbatch
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    memory: dict[str, float] = field(default_factory=dict)

    @property
    def n_devices(self) -> int:
        return len(self.device_ids)


@dataclass
class Plan:
    strategy: str                            # "auto", "3d", "dp", ... and its config in `config`
    model: dict[str, Any]                    # name (loadable), params, seq, layers, flops_per_step
    cluster: dict[str, Any]                  # preset or spec, nodes, gpus_per_node, gpu
    training: dict[str, Any]                 # global_batch, microbatch_size, n_microbatches, dtype,
                                             # schedule, virtual_stages, zero, optimizer
    stages: list[StagePlan]
    config: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    # Wall-clock seconds of the search phases: shown to the user, kept out of the JSON so the
    # same inputs give the same bytes.
    timing: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def n_devices(self) -> int:
        """Distinct GPUs the plan uses (an interleaved plan's chunks share their rank's GPUs)."""
        return len({d for s in self.stages for d in s.device_ids})

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {"schema": SCHEMA_ID, "strategy": self.strategy, "config": self.config, "model": self.model,
             "cluster": self.cluster, "training": self.training,
             "stages": [_stage_dict(s) for s in self.stages],
             "predicted": self.predicted, "search": self.search}
        return _clean(d)

    def to_json(self, path: str | Path | None = None) -> str:
        d = self.to_dict()
        validate(d)
        text = json.dumps(d, indent=1, sort_keys=True) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        validate(d)
        stages = [StagePlan(index=s["index"], layers=tuple(s["layers"]), layer_names=list(s["layer_names"]),
                            submesh=tuple(s["submesh"]), device_ids=list(s["device_ids"]),
                            logical_mesh=tuple(s["logical_mesh"]), strategies=dict(s["strategies"]),
                            input_spec=s.get("input_spec", ""), recompute=s.get("recompute", "none"),
                            ops=list(s.get("ops", [])), t_intra_s=s.get("t_intra_s", 0.0),
                            fwd_s=s.get("fwd_s", 0.0), bwd_s=s.get("bwd_s", 0.0), memory=dict(s.get("memory", {})))
                  for s in d["stages"]]
        return cls(d["strategy"], d["model"], d["cluster"], d["training"], stages, d.get("config", {}),
                   d.get("predicted", {}), d.get("search", {}))

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Plan:
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        if p is not None:
            if not p.exists():
                raise PlanError(f"plan file {str(p)!r} does not exist")
            text = p.read_text()
        else:
            text = str(text_or_path)
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(d)


def _stage_dict(s: StagePlan) -> dict[str, Any]:
    d = asdict(s)
    d["layers"] = list(s.layers)
    d["submesh"] = list(s.submesh)
    d["logical_mesh"] = list(s.logical_mesh)
    return d


def _clean(x):
    """Floats rounded to 9 significant digits so the same inputs give the same bytes on any
    machine; tuples to lists; infinities to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        if x != x or x in (float("inf"), float("-inf")):
            return None
        return float(f"{x:.9g}")
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):   # numpy scalars
        return _clean(x.item())
    return x


def schema() -> dict[str, Any]:
    return json.loads(resources.files("autopar").joinpath("schema", "plan.schema.json").read_text())


def validate(d: Any) -> None:
    import jsonschema
    try:
        jsonschema.validate(d, schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise PlanError(f"plan does not match {SCHEMA_ID} at {where}: {e.message}") from None
    # Cross-field rules the schema cannot say.
    seen: set[int] = set()
    prev_end = None
    v = d["training"].get("virtual_stages", 1) if d["training"]["schedule"] == "interleaved" else 1
    if len(d["stages"]) % v:
        raise PlanError(f"plan training/virtual_stages: {len(d['stages'])} stages do not split into {v} chunks")
    ranks = len(d["stages"]) // v
    for s in d["stages"]:
        ids = s["device_ids"]
        d0, d1 = s["logical_mesh"]
        if d0 * d1 != len(ids):
            raise PlanError(f"plan stages/{s['index']}: logical_mesh {d0}x{d1} does not match "
                            f"{len(ids)} device_ids")
        if s["index"] >= ranks:          # an interleaved chunk runs on its rank's devices
            if ids != d["stages"][s["index"] % ranks]["device_ids"]:
                raise PlanError(f"plan stages/{s['index']}/device_ids: an interleaved chunk must use the "
                                f"devices of stage {s['index'] % ranks}")
        elif seen & set(ids):
            raise PlanError(f"plan stages/{s['index']}: device ids {sorted(seen & set(ids))} are used by "
                            f"an earlier stage")
        seen |= set(ids)
        a, b = s["layers"]
        if prev_end is not None and a != prev_end:
            raise PlanError(f"plan stages/{s['index']}/layers: starts at layer {a}, but the previous "
                            f"stage ends at {prev_end}")
        if b <= a:
            raise PlanError(f"plan stages/{s['index']}/layers: empty range [{a}, {b})")
        prev_end = b
