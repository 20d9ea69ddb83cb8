"""Hand-made plans, built by rule (Megatron-LM's 3D parallelism and its special cases).

Megatron-style (dp, tp, pp): equal-block pipeline stages (the embedding joins the first, the
head the last), each stage a logical mesh (dp, tp) with tp on consecutive GPUs of a node;
column-parallel linears where the activation arrives whole, row-parallel (all-reduce) where it
arrives split by a column-parallel linear or by head-parallel attention, head-parallel
attention, vocab-parallel embedding and loss, the batch split over dp.

With sequence parallelism (Korthikanti et al. 2022) the row-parallel linears and the
vocab-parallel embedding reduce-scatter instead of all-reducing, so the residual stream, the
norms and the elementwise ops between them run split over the tp axis (on the sequence, or on
the batch where dp leaves it free and it divides); the column-parallel linears all-gather their
input (autopar.sharding.stage_problem prices that edge as Megatron runs it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.evaluator import EAGER_DEFAULT, evaluate
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.specs import Cluster
from autopar.plan import ClusterInfo, ModelInfo, Plan, PlanConfig, PlanError, StagePlan, Training
from autopar.sharding.rules import PER_PART, is_decision, leader_operand, parse_equation, strategy_name
from autopar.sharding.spec import spec_str
from autopar.sharding.stage_problem import decision_names
from graphs.ir import ATTENTION, EMBEDDING, INPUT, MATMUL, NORM, OpGraph
from graphs.query import main_boundary, stage_nodes


@dataclass(frozen=True)
class Config3D:
    dp: int
    tp: int
    pp: int
    microbatch: int                 # per data-parallel rank (Megatron's micro-batch size)
    recompute: str = "none"
    schedule: str = "1f1b"
    virtual_stages: int = 1
    zero: int = 0
    sequence_parallel: bool = False

    def label(self) -> str:
        s = f"dp{self.dp} tp{self.tp} pp{self.pp} mb{self.microbatch}"
        if self.recompute != "none":
            s += f" rc:{self.recompute}"
        if self.schedule != "1f1b":
            s += f" {self.schedule}" + (f"x{self.virtual_stages}" if self.schedule == "interleaved" else "")
        if self.zero:
            s += f" zero{self.zero}"
        if self.sequence_parallel and self.tp > 1:
            s += " sp"
        return s

    def training(self, global_batch: int, dtype: str) -> Training:
        """The plan's training settings: a pipeline microbatch is `microbatch` samples per
        data-parallel rank."""
        return Training.split(global_batch, self.microbatch * self.dp, dtype=dtype, schedule=self.schedule,
                              virtual_stages=self.virtual_stages if self.schedule == "interleaved" else 1,
                              zero=self.zero)


def check_config(cfg: Config3D, cluster: Cluster, global_batch: int, n_blocks: int,
                 dtype: str = "bf16") -> Training:
    """The configuration's training settings; PlanError naming the rule it breaks."""
    for name in ("dp", "tp", "pp", "microbatch", "virtual_stages"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a whole number >= 1 (got {value!r})")
    n = cluster.n_gpus
    if cfg.dp * cfg.tp * cfg.pp != n:
        raise PlanError(f"dp*tp*pp = {cfg.dp}*{cfg.tp}*{cfg.pp} = {cfg.dp * cfg.tp * cfg.pp} must equal the "
                        f"cluster's {n} GPUs")
    if cfg.tp > cluster.gpus_per_node or cluster.gpus_per_node % cfg.tp:
        raise PlanError(f"tp={cfg.tp} must divide the {cluster.gpus_per_node} GPUs of a node (tensor "
                        f"parallelism stays inside a node)")
    if cfg.dp * cfg.tp > cluster.gpus_per_node and (cfg.dp * cfg.tp) % cluster.gpus_per_node:
        raise PlanError(f"a stage of dp*tp={cfg.dp * cfg.tp} GPUs must fill whole nodes of "
                        f"{cluster.gpus_per_node}")
    training = cfg.training(global_batch, dtype)       # the batch split, schedule and ZeRO stage
    if cfg.recompute not in ("none", "selective", "full"):
        raise PlanError(f"recompute must be none, selective or full (got {cfg.recompute!r})")
    v = training.virtual_stages
    if n_blocks < cfg.pp * v:
        raise PlanError(f"{n_blocks} transformer blocks cannot fill pp*virtual_stages = {cfg.pp * v} stages")
    if cfg.schedule == "interleaved":
        m = training.n_microbatches
        if cfg.pp < 2:
            raise PlanError("interleaved schedule needs pp >= 2")
        if m % cfg.pp:
            raise PlanError(f"interleaved schedule needs the number of microbatches ({m}) to be a multiple "
                            f"of pp={cfg.pp}")
    return training


def split_blocks(n_layers: int, parts: int) -> list[tuple[int, int]]:
    """Equal-block ranges over graph layers: layer 0 (embed) joins the first part, the last
    layer (head) the last part; the L blocks in between are split as evenly as possible."""
    n_blocks = n_layers - 2
    bounds = [1 + (n_blocks * i) // parts for i in range(parts + 1)]
    bounds[0], bounds[-1] = 0, n_layers
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def _walk_back_is_split(graph: OpGraph, name: str, inside: set[str]) -> bool:
    """Does this matmul's activation arrive split by a column-parallel matmul or by
    head-parallel attention (so Megatron makes it row-parallel)?"""
    node = graph.node(name)
    src = node.operands[0].source
    for _ in range(64):
        if src is None or src not in inside:
            return False
        n = graph.node(src)
        if n.kind == ATTENTION:
            return True
        if n.kind == MATMUL:
            if any(o.is_param for o in n.operands):
                return True
            # eager attention's QK^T / PV matmuls are head-parallel under Megatron
            return "equation" in n.attrs and _act_matmul_letters(n.attrs["equation"])[1] is not None
        if n.kind in (NORM, EMBEDDING, INPUT) or n.op in ("add", "sub"):
            return False
        li = leader_operand(n)
        if li is None:
            return False
        src = n.operands[li].source
    return False


def _act_matmul_letters(equation: str) -> tuple[str | None, str | None]:
    """(data-parallel letter, tensor-parallel letter) of a matmul of two activations, such as
    eager attention's QK^T "bhmk,bhkn->bhmn": the batch dims both operands and the output carry;
    the first is the batch, the second the heads (Megatron splits attention by heads)."""
    ins, o = parse_equation(equation)
    if len(ins) < 2:
        return None, None
    shared = [c for c in ins[0] if c in ins[1] and c in o]
    return (shared[0] if shared else None), (shared[1] if len(shared) > 1 else None)


def megatron_names(graph: OpGraph, names: list[str], dp: int, tp: int) -> dict[str, list[str]]:
    """Strategy names per decision node, best first (fallbacks when a split does not divide)."""
    inside = set(names)
    dpm = 1 if dp > 1 else 0
    tpm = 2 if tp > 1 else 0
    out: dict[str, list[str]] = {}
    for name in names:
        n = graph.node(name)
        if not is_decision(n):
            continue
        lt_dp: dict[str, int] = {}
        lt_tp: dict[str, int] = {}
        if n.kind == MATMUL and "equation" in n.attrs and len(n.operands) >= 2:
            ins, o = parse_equation(n.attrs["equation"])
            a, b = ins[0], ins[1]
            if n.operands[1].is_param:
                batch = next((c for c in a if c in o and c not in b), None) or next((c for c in a if c in o), None)
            else:   # two activations: batch over dp, heads over tp
                batch, head = _act_matmul_letters(n.attrs["equation"])
                batch = batch or next((c for c in a if c in o), None)
                if head:
                    lt_tp[head] = tpm
            if batch:
                lt_dp[batch] = dpm
            if n.operands[1].is_param:
                if _walk_back_is_split(graph, name, inside):
                    t = next((c for c in b if c in a and c not in o), None)     # row: contracted
                else:
                    t = next((c for c in b if c in o and c not in a), None)     # column: output
                if t:
                    lt_tp[t] = tpm
        elif n.kind == ATTENTION:
            lt_dp["b"], lt_tp["h"] = dpm, tpm
        elif n.kind == EMBEDDING:
            if n.operands[0].source is not None:
                lt_dp["b"] = dpm
            lt_tp["v"] = tpm
        elif n.kind == INPUT:
            lt_dp["b"] = dpm
        both = {**lt_dp, **lt_tp}
        wanted = [strategy_name(both), strategy_name(lt_dp), strategy_name(lt_tp), "R"]
        fused = n.attrs.get("fused_parts") if n.kind == MATMUL else None
        if fused and lt_tp.get(parse_equation(n.attrs["equation"])[1][fused[0]]):
            wanted.insert(0, wanted[0] + PER_PART)          # a fused q|k|v or gate|up: each part column-parallel
        out[name] = list(dict.fromkeys(wanted))
    return out


def _boundary_spec(shape: tuple[int, ...], dp: int, sp_tp: int) -> tuple[int, ...]:
    """The layout a stage's input arrives in: the batch split over dp (mesh axis 0); with
    sequence parallelism over `sp_tp` > 1, also the first other dim that divides split over tp
    (axis 1), the dim a row-parallel linear's reduce-scatter splits (rules/einsum.py)."""
    spec = [0] * len(shape)
    if dp > 1 and shape and shape[0] % dp == 0:
        spec[0] = 1
    if sp_tp > 1:
        d = next((i for i, n in enumerate(shape) if spec[i] == 0 and n % sp_tp == 0), None)
        if d is not None:
            spec[d] = 2
    return tuple(spec)


def _device_ids_for(stage_rank: int, dp: int, tp: int) -> list[int]:
    n = dp * tp
    return list(range(stage_rank * n, (stage_rank + 1) * n))


def _submesh_for(n_devices: int, cluster: Cluster) -> tuple[int, int]:
    m = cluster.gpus_per_node
    return (1, n_devices) if n_devices <= m else (n_devices // m, m)


def build_3d(source, cluster: Cluster, global_batch: int, cfg: Config3D, dtype: str | None = None,
             label: str | None = None, eager: bool = EAGER_DEFAULT) -> Plan:
    """A Megatron-style plan, evaluated (with `eager`, as the eager PyTorch recipe runs it:
    see autopar.evaluation.evaluator.evaluate)."""
    plan, graph = _unevaluated_3d(source, cluster, global_batch, cfg, dtype, label)
    return evaluate(plan, graph, cluster, eager=eager)


def build_3d_recomputes(source, cluster: Cluster, global_batch: int, cfg: Config3D, recomputes: tuple[str, ...],
                        dtype: str | None = None, label: str | None = None) -> list[Plan]:
    """`build_3d` of `cfg` under each recomputation setting, its stages' strategies chosen once
    (they do not depend on it)."""
    plan, graph = _unevaluated_3d(source, cluster, global_batch, cfg, dtype, label)
    out = []
    for rc in recomputes:
        c = dataclasses.replace(cfg, recompute=rc)
        check_config(c, cluster, global_batch, len(graph.layers) - 2, plan.training.dtype)
        stages = [dataclasses.replace(st, recompute=rc) for st in plan.stages]
        config = PlanConfig("megatron", c.label(), dataclasses.asdict(c))
        out.append(evaluate(dataclasses.replace(plan, stages=stages, config=config), graph, cluster))
    return out


def _unevaluated_3d(source, cluster: Cluster, global_batch: int, cfg: Config3D, dtype: str | None,
                    label: str | None) -> tuple[Plan, OpGraph]:
    dtype = cluster.gpu.training_dtype(dtype)
    graph1 = source.graph(cfg.microbatch * cfg.dp) if source.fixed_batch is None else source.graph(source.fixed_batch)
    n_blocks = len(graph1.layers) - 2
    training = check_config(cfg, cluster, global_batch, n_blocks, dtype)
    graph = graph1
    v = training.virtual_stages
    ranges = split_blocks(len(graph.layers), cfg.pp * v)
    cm = ComputeModel(cluster.gpu, dtype)
    sub = Submesh(*_submesh_for(cfg.dp * cfg.tp, cluster))
    mesh = Mesh(cluster, sub, (cfg.dp, cfg.tp))
    sp = cfg.sequence_parallel and cfg.tp > 1
    stages = []
    for g, (a, b) in enumerate(ranges):
        names = stage_nodes(graph, (a, b))
        bsrc = main_boundary(graph, names)
        bspec: tuple[int, ...] = ()
        if bsrc is not None:
            bspec = _boundary_spec(graph.node(bsrc).out_shape, cfg.dp, cfg.tp if sp else 1)
        offered = decision_names(graph, names, mesh, cm)
        wanted = megatron_names(graph, names, cfg.dp, cfg.tp)
        chosen = {}
        for root, have in offered.items():
            if root not in wanted:
                continue
            pick = next((w for w in wanted[root] if w in have), have[0])
            if sp:      # the reduce-scatter variant of a row-parallel linear or vocab-parallel embedding
                pick = next((h for h in have if h.startswith(pick + "+rs:")), pick)
            chosen[root] = pick
        stages.append(StagePlan(index=g, layers=(a, b), layer_names=[graph.layers[i].name for i in range(a, b)],
                                submesh=(sub.n_nodes, sub.gpus_per_node),
                                device_ids=_device_ids_for(g % cfg.pp, cfg.dp, cfg.tp),
                                logical_mesh=(cfg.dp, cfg.tp), strategies=chosen,
                                input_spec=spec_str(bspec) if bsrc else "", recompute=cfg.recompute))
    plan = Plan(strategy=label or "3d", config=PlanConfig("megatron", cfg.label(), dataclasses.asdict(cfg)),
                model=ModelInfo.of(graph, source.name, source.loadable), cluster=ClusterInfo.of(cluster), training=training,
                stages=stages)
    return plan, graph
