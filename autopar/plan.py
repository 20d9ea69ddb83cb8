"""The parallel plan: what runs where, and its JSON (`autopar.plan/v1`, validated both ways).

A plan's parts are typed: ModelInfo and ClusterInfo say what it was made for, Training holds the
training settings (and is the one place they are checked), PlanConfig names the plan, StagePlan
places each pipeline stage, and the evaluator fills in each StageMemory and the Prediction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema

if TYPE_CHECKING:      # for annotations only: plan.py imports nothing from autopar (docs/ARCHITECTURE.md)
    from autopar.hardware.specs import Cluster
    from graphs.ir import OpGraph

SCHEMA_ID = "autopar.plan/v1"
DTYPES = ("bf16", "fp16", "fp32")
SCHEDULES = ("1f1b", "gpipe", "interleaved")
ZERO_STAGES = (0, 1, 2, 3)


class PlanError(ValueError):
    """A plan file is malformed, or a plan is inconsistent with its model or cluster."""


@dataclass(frozen=True)
class ModelInfo:
    """The model a plan was made for; `name` rebuilds it where `loadable`."""

    name: str
    params: int
    seq: int
    n_layers: int                            # graph layers: embedding, blocks, head
    family: str = ""
    loadable: bool = True
    flops_per_step: float | None = None      # model FLOPs of one training step, set by the evaluator

    @classmethod
    def of(cls, graph: OpGraph, name: str, loadable: bool) -> ModelInfo:
        """The model traced into `graph`, known to the user as `name`."""
        return cls(name=name, params=graph.param_count, seq=graph.seq, n_layers=len(graph.layers),
                   family=graph.meta.get("family", ""), loadable=loadable)


@dataclass(frozen=True)
class ClusterInfo:
    """The cluster a plan was made for (its full spec lives in the preset or cluster file)."""

    name: str
    nodes: int
    gpus_per_node: int
    gpu: str

    @classmethod
    def of(cls, cluster: Cluster) -> ClusterInfo:
        return cls(name=cluster.name, nodes=cluster.n_nodes, gpus_per_node=cluster.gpus_per_node,
                   gpu=cluster.gpu.name)


@dataclass(frozen=True, kw_only=True)
class Training:
    """How a step trains: a global batch of `n_microbatches` pipeline microbatches of
    `microbatch_size` samples each. Invalid settings raise PlanError naming the field."""

    global_batch: int
    microbatch_size: int
    n_microbatches: int
    dtype: str
    schedule: str = "1f1b"
    virtual_stages: int = 1                  # model chunks per GPU; above 1 only when interleaved
    zero: int = 0                            # 0 none, 1 optimizer states, 2 + gradients, 3 + weights
    optimizer: str = "adam-mixed-precision"

    def __post_init__(self) -> None:
        for name in ("global_batch", "microbatch_size", "n_microbatches", "virtual_stages"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise PlanError(f"training.{name} must be an integer >= 1 (got {value!r})")
        gb, mbs = self.global_batch, self.microbatch_size
        if gb % mbs:
            raise PlanError(f"training.microbatch_size: global batch {gb} is not divisible by microbatch size {mbs}")
        if self.n_microbatches != gb // mbs:
            raise PlanError(f"training.n_microbatches: {self.n_microbatches} microbatches of {mbs} do not make "
                            f"the global batch {gb} (need {gb // mbs})")
        if self.dtype not in DTYPES:
            raise PlanError(f"training.dtype must be bf16, fp16 or fp32 (got {self.dtype!r})")
        if self.schedule not in SCHEDULES:
            raise PlanError(f"training.schedule must be 1f1b, gpipe or interleaved (got {self.schedule!r})")
        if self.schedule == "interleaved" and self.virtual_stages < 2:
            raise PlanError(f"training.virtual_stages: the interleaved schedule needs 2 or more chunks per GPU "
                            f"(got {self.virtual_stages})")
        if self.schedule != "interleaved" and self.virtual_stages != 1:
            raise PlanError(f"training.virtual_stages: {self.virtual_stages} chunks per GPU need the interleaved "
                            f"schedule (got {self.schedule!r})")
        if not _is_int(self.zero) or self.zero not in ZERO_STAGES:
            raise PlanError(f"training.zero must be 0, 1, 2 or 3 (got {self.zero!r})")
        if not isinstance(self.optimizer, str) or not self.optimizer:
            raise PlanError(f"training.optimizer must be a non-empty string (got {self.optimizer!r})")

    @classmethod
    def split(cls, global_batch: int, microbatch_size: int, **settings: Any) -> Training:
        """The global batch split into microbatches of `microbatch_size` (which must divide it)."""
        valid = _is_int(global_batch) and _is_int(microbatch_size) and microbatch_size > 0
        n = global_batch // microbatch_size if valid else 0     # if not, __post_init__ says which is wrong
        return cls(global_batch=global_batch, microbatch_size=microbatch_size, n_microbatches=n, **settings)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class Prediction:
    """The evaluator's figures for one training step."""

    step_time_s: float
    tokens_per_s: float
    model_flops_per_step: float
    hardware_flops_per_step: float           # model FLOPs plus recomputed forwards
    tflops_per_gpu: float                    # model FLOPs per second per GPU / 1e12
    hardware_tflops_per_gpu: float
    mfu: float                               # model FLOPs / (step time x GPUs x peak)
    bubble_fraction: float                   # pipeline idle / (idle + busy)
    pipeline_s: float                        # the simulated schedule's makespan
    grad_sync_s: float                       # slowest stage
    optimizer_s: float                       # slowest stage
    p2p_s: float                             # stage-to-stage transfers of one microbatch, summed
    compute_s_per_microbatch: float          # summed over stages
    comm_s_per_microbatch: float             # summed over stages
    peak_memory_bytes: float                 # the fullest GPU
    memory_limit_bytes: float
    fits: bool
    # Where the time and memory go (issue 13; autopar.costmodel.eager). None where a plan file
    # written before them lacks them (and then left out of the JSON again). peak_memory_bytes = peak_reserved_bytes + CUDA context
    # + NCCL; breakdown_s of the slowest GPU adds up to step_time_s (blocks, head_loss,
    # embedding, precision_casts, optimizer, exposed_comm, comm_overlap, gpu_idle,
    # pipeline_grad_scale, bubble, host); memory_breakdown_bytes
    # of the fullest GPU adds up to peak_memory_bytes.
    peak_allocated_bytes: float | None = None
    peak_reserved_bytes: float | None = None
    host_s: float | None = None              # the host's dispatch time of one step (busiest GPU's process)
    breakdown_s: Mapping[str, float] | None = None
    memory_breakdown_bytes: Mapping[str, float] | None = None


@dataclass(frozen=True)
class StageMemory:
    """Bytes per device of one stage, as the evaluator counts them."""

    param_state_bytes: float                 # weights + gradients + optimizer state, after ZeRO (and
                                             # DDP's buckets, autocast's weight cache: held all step)
    activation_bytes: float                  # stashes of the microbatches in flight + working
    stash_per_microbatch_bytes: float
    inflight_microbatches: float
    working_bytes: float                     # transient peak: a recomputed layer, or the fp32 loss
    total_bytes: float


@dataclass(frozen=True)
class PlanConfig:
    """How the plan was made: `kind` ("auto", "megatron"), a short label, and the kind's own
    settings (Megatron's dp, tp, pp, microbatch, ...), written next to them in the JSON."""

    kind: str = ""
    label: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        named = {k: v for k, v in (("kind", self.kind), ("label", self.label)) if v}
        return {**self.settings, **named}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanConfig:
        return cls(kind=d.get("kind", ""), label=d.get("label", ""),
                   settings={k: v for k, v in d.items() if k not in ("kind", "label")})


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
    # with "full": the stage's first k layers are recomputed and the rest keep their activations
    # (Megatron's --recompute-method block --recompute-num-layers k); None: all of them
    recompute_layers: int | None = None
    # decision ops whose parameter group is stored sharded (ZeRO-3) in a ZeRO-1/2 plan
    # (StageProblem.solve_storage); empty: every parameter at the plan's ZeRO level
    sharded_storage: list[str] = field(default_factory=list)
    # filled by the evaluator
    ops: list[dict[str, Any]] = field(default_factory=list)   # per op: name, op, kind, strategy, specs, costs
    t_intra_s: float = 0.0                   # forward + backward per microbatch
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    memory: StageMemory | None = None

    @property
    def n_devices(self) -> int:
        return len(self.device_ids)


@dataclass
class Plan:
    strategy: str                            # "auto", "3d", "dp", ... and how it was made in `config`
    model: ModelInfo
    cluster: ClusterInfo
    training: Training
    stages: list[StagePlan]
    config: PlanConfig = field(default_factory=PlanConfig)
    prediction: Prediction | None = None     # set by the evaluator; read it as `predicted`
    search: dict[str, Any] = field(default_factory=dict)
    # Wall-clock seconds of the search phases: shown to the user, kept out of the JSON so the
    # same inputs give the same bytes.
    timing: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def n_devices(self) -> int:
        """Distinct GPUs the plan uses (an interleaved plan's chunks share their rank's GPUs)."""
        return len({d for s in self.stages for d in s.device_ids})

    @property
    def predicted(self) -> Prediction:
        if self.prediction is None:
            raise PlanError(f"plan {self.config.label or self.strategy!r} has no prediction; evaluate it first "
                            "(autopar.evaluate)")
        return self.prediction

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {"schema": SCHEMA_ID, "strategy": self.strategy, "config": self.config.to_dict(),
             "model": _record_dict(self.model),
             "cluster": dataclasses.asdict(self.cluster), "training": dataclasses.asdict(self.training),
             "stages": [_stage_dict(s) for s in self.stages],
             "predicted": _record_dict(self.prediction) if self.prediction is not None else {},
             "search": self.search}
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
        stages = [StagePlan(index=s["index"], layers=_pair(s["layers"]), layer_names=list(s["layer_names"]),
                            submesh=_pair(s["submesh"]), device_ids=list(s["device_ids"]),
                            logical_mesh=_pair(s["logical_mesh"]), strategies=dict(s["strategies"]),
                            input_spec=s.get("input_spec", ""), recompute=s.get("recompute", "none"),
                            recompute_layers=s.get("recompute_layers"),
                            sharded_storage=list(s.get("sharded_storage", [])),
                            ops=[dict(o) for o in s.get("ops", [])], t_intra_s=_seconds(s.get("t_intra_s", 0.0)),
                            fwd_s=_seconds(s.get("fwd_s", 0.0)), bwd_s=_seconds(s.get("bwd_s", 0.0)),
                            memory=_read(StageMemory, s["memory"], f"stages/{s['index']}/memory")
                            if s.get("memory") else None)
                  for s in d["stages"]]
        predicted = d.get("predicted") or None
        return cls(strategy=d["strategy"], model=_read(ModelInfo, d["model"], "model"),
                   cluster=_read(ClusterInfo, d["cluster"], "cluster"),
                   training=_read(Training, d["training"], "training"), stages=stages,
                   config=PlanConfig.from_dict(d.get("config", {})),
                   prediction=_read(Prediction, predicted, "predicted") if predicted else None,
                   search=dict(d.get("search", {})))

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


def _pair(x: Any) -> tuple[int, int]:
    a, b = x
    return (a, b)


def _seconds(x: float | None) -> float:
    """JSON null stands for an infinite (or undefined) time, which JSON cannot write."""
    return math.inf if x is None else x


def _read(cls: Any, d: Mapping[str, Any], where: str) -> Any:
    """One of the frozen records from its JSON object; unknown or missing fields are errors that
    name the field (a misspelt setting must not be dropped silently)."""
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(d) - names)
    if unknown:
        raise PlanError(f"plan {where}/{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PlanError(f"plan {where}/{missing[0]}: required field is missing")
    # Floats written as null (infinities) come back as infinities; other values as written.
    values = {f.name: _seconds(d[f.name]) if f.type == "float" else d[f.name] for f in fields if f.name in d}
    return cls(**values)


def _record_dict(record: Any) -> dict[str, Any]:
    """A frozen record's JSON object; optional fields that are None (absent from the file it
    came from, or not computed) are left out."""
    d = dataclasses.asdict(record)
    for f in dataclasses.fields(record):
        if f.default is None and d[f.name] is None:
            del d[f.name]
    return d


def _stage_dict(s: StagePlan) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d["layers"] = list(s.layers)
    d["submesh"] = list(s.submesh)
    d["logical_mesh"] = list(s.logical_mesh)
    d["memory"] = d["memory"] or {}
    if d["recompute_layers"] is None:
        del d["recompute_layers"]          # all layers, or none: plan files as before per-layer recomputation
    if not d["sharded_storage"]:
        del d["sharded_storage"]           # every parameter at the plan's ZeRO level: plan files as before
    return d


def _clean(x):
    """Floats rounded to 9 significant digits so the same inputs give the same bytes on any
    machine; tuples to lists; infinities to None."""
    if isinstance(x, Mapping):
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
    return json.loads((resources.files("autopar") / "schema" / "plan.schema.json").read_text())


def validate(d: Any) -> None:
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
        if s.get("sharded_storage"):
            zero = d["training"].get("zero", 0)
            if zero not in (1, 2):
                raise PlanError(f"plan stages/{s['index']}/sharded_storage: per-op sharded storage needs ZeRO 1 or 2 "
                                f"(training/zero is {zero}); leave it out otherwise")
        k = s.get("recompute_layers")
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= b - a:
                raise PlanError(f"plan stages/{s['index']}/recompute_layers must be a whole number of the "
                                f"stage's layers, 0 to {b - a} (got {k!r})")
            if s.get("recompute", "none") != "full":
                raise PlanError(f"plan stages/{s['index']}/recompute_layers: {k} layers recomputed needs "
                                f"recompute \"full\" (got {s.get('recompute', 'none')!r}); leave it out otherwise")
