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

With context parallelism (cp > 1, Megatron-Core's --context-parallel-size) the sequence is split
over cp GPUs through every layer: the linears split their tokens over the cp axis (their weight
gradients reduced over it, as over dp), attention exchanges K/V over it (ring attention, Megatron's
default "p2p"; all-gathered K/V where that is cheaper: rules/attention.py), causal load balanced.
The logical mesh is 2-D, so cp shares it with tp (dp = 1: mesh (cp, tp)) or with dp (tp = 1:
mesh (dp, cp)); a configuration with dp, cp and tp all above 1 has no 2-D mesh and is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from autopar.costmodel.compute import ComputeModel
from autopar.evaluation.evaluator import EAGER_DEFAULT, evaluate, evaluate_stage
from autopar.hardware.mesh import Mesh, Submesh
from autopar.hardware.specs import Cluster
from autopar.plan import ClusterInfo, ModelInfo, Plan, PlanConfig, PlanError, StagePlan, Training
from autopar.sharding.rules import PER_PART, is_decision, leader_operand, parse_equation, strategy_name
from autopar.sharding.rules.attention import CP_KINDS, CP_SUFFIX
from autopar.sharding.rules.einsum import batch_like_letters
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
    cp: int = 1                     # context-parallel size (the sequence split over cp GPUs)
    # with recompute "full": Megatron's --recompute-method block --recompute-num-layers N, the
    # first N transformer blocks of each (virtual) stage recomputed, the rest kept; None: all
    recompute_num_layers: int | None = None

    def label(self) -> str:
        s = f"dp{self.dp} tp{self.tp} pp{self.pp}" + (f" cp{self.cp}" if self.cp > 1 else "") + f" mb{self.microbatch}"
        if self.recompute != "none":
            s += f" rc:{self.recompute}"
            if self.recompute_num_layers is not None:
                s += f"/{self.recompute_num_layers}"
        if self.schedule != "1f1b":
            s += f" {self.schedule}" + (f"x{self.virtual_stages}" if self.schedule == "interleaved" else "")
        if self.zero:
            s += f" zero{self.zero}"
        if self.sequence_parallel and self.tp > 1:
            s += " sp"
        return s

    @property
    def stage_devices(self) -> int:
        return self.dp * self.cp * self.tp

    def mesh_shape(self) -> tuple[int, int]:
        """The stage's logical mesh: (dp, tp), or with context parallelism (cp, tp) or (dp, cp)."""
        if self.cp == 1:
            return self.dp, self.tp
        return (self.cp, self.tp) if self.dp == 1 else (self.dp, self.cp)

    def axis_masks(self) -> tuple[int, int, int]:
        """Mesh-axis masks of (dp, cp, tp) on `mesh_shape` (0 where the degree is 1)."""
        if self.cp == 1:
            return (1 if self.dp > 1 else 0), 0, (2 if self.tp > 1 else 0)
        if self.dp == 1:
            return 0, 1, (2 if self.tp > 1 else 0)
        return 1, 2, 0

    def training(self, global_batch: int, dtype: str) -> Training:
        """The plan's training settings: a pipeline microbatch is `microbatch` samples per
        data-parallel rank."""
        return Training.split(global_batch, self.microbatch * self.dp, dtype=dtype, schedule=self.schedule,
                              virtual_stages=self.virtual_stages if self.schedule == "interleaved" else 1,
                              zero=self.zero)


def check_config(cfg: Config3D, cluster: Cluster, global_batch: int, n_blocks: int,
                 dtype: str = "bf16") -> Training:
    """The configuration's training settings; PlanError naming the rule it breaks."""
    for name in ("dp", "tp", "pp", "cp", "microbatch", "virtual_stages"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a whole number >= 1 (got {value!r})")
    n = cluster.n_gpus
    product = f"dp*tp*pp*cp = {cfg.dp}*{cfg.tp}*{cfg.pp}*{cfg.cp}" if cfg.cp > 1 else \
        f"dp*tp*pp = {cfg.dp}*{cfg.tp}*{cfg.pp}"
    if cfg.stage_devices * cfg.pp != n:
        raise PlanError(f"{product} = {cfg.stage_devices * cfg.pp} must equal the cluster's {n} GPUs")
    if cfg.tp > cluster.gpus_per_node or cluster.gpus_per_node % cfg.tp:
        raise PlanError(f"tp={cfg.tp} must divide the {cluster.gpus_per_node} GPUs of a node (tensor "
                        f"parallelism stays inside a node)")
    if cfg.stage_devices > cluster.gpus_per_node and cfg.stage_devices % cluster.gpus_per_node:
        raise PlanError(f"a stage of dp*tp{'*cp' if cfg.cp > 1 else ''}={cfg.stage_devices} GPUs must fill whole nodes of "
                        f"{cluster.gpus_per_node}")
    if cfg.cp > 1 and cfg.dp > 1 and cfg.tp > 1:
        raise PlanError(f"dp={cfg.dp}, cp={cfg.cp} and tp={cfg.tp} need a 3-D device mesh; stage meshes are 2-D: "
                        "set dp=1 (mesh cp x tp) or tp=1 (mesh dp x cp)")
    if cfg.cp > 1 and cfg.microbatch % cfg.cp == 0:
        raise PlanError(f"cp={cfg.cp} with microbatch {cfg.microbatch}: the microbatch divides over the cp GPUs, so "
                        f"splitting it there (dp={cfg.dp * cfg.cp}, microbatch {cfg.microbatch // cfg.cp}) is the same "
                        "plan at no more cost (autopar/sharding/rules/einsum.py); use that configuration")
    training = cfg.training(global_batch, dtype)       # the batch split, schedule and ZeRO stage
    if cfg.recompute not in ("none", "selective", "full"):
        raise PlanError(f"recompute must be none, selective or full (got {cfg.recompute!r})")
    if cfg.recompute_num_layers is not None and (cfg.recompute != "full" or cfg.recompute_num_layers < 1):
        raise PlanError(f"recompute_num_layers {cfg.recompute_num_layers} needs recompute 'full' and at least one "
                        f"block (got recompute {cfg.recompute!r})")
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


def megatron_names(graph: OpGraph, names: list[str], dp: int, tp: int, cp: int = 1) -> dict[str, list[str]]:
    """Strategy names per decision node, best first (fallbacks when a split does not divide).
    With cp > 1 the linears and attention split the sequence over the cp axis; those names
    have no fallback (a context-parallel configuration that cannot split is refused)."""
    inside = set(names)
    dpm, cpm, tpm = Config3D(dp, tp, 1, 1, cp=cp).axis_masks()
    out: dict[str, list[str]] = {}
    for name in names:
        n = graph.node(name)
        if not is_decision(n):
            continue
        lt_dp: dict[str, int] = {}
        lt_tp: dict[str, int] = {}
        cp_names: list[str] = []
        if n.kind == MATMUL and "equation" in n.attrs and len(n.operands) >= 2:
            ins, o = parse_equation(n.attrs["equation"])
            a, b = ins[0], ins[1]
            batch_like = batch_like_letters(ins, o, n)      # [] unless operand 1 is a weight
            if n.operands[1].is_param:
                batch = batch_like[0] if batch_like else next((c for c in a if c in o), None)
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
                if cpm and len(batch_like) > 1:                 # the second batch-like letter: the sequence
                    cp_names = [strategy_name({**lt_dp, batch_like[1]: cpm, **lt_tp})]
        elif n.kind == ATTENTION:
            lt_dp["b"], lt_tp["h"] = dpm, tpm
            if cpm:
                base = strategy_name({**lt_dp, "s": cpm, **lt_tp})
                cp_names = [base + CP_SUFFIX + k for k in CP_KINDS]
        elif n.kind == EMBEDDING:
            if n.operands[0].source is not None:
                lt_dp["b"] = dpm
            lt_tp["v"] = tpm
        elif n.kind == INPUT:
            lt_dp["b"] = dpm
        both = {**lt_dp, **lt_tp}
        wanted = [strategy_name(both), strategy_name(lt_dp), strategy_name(lt_tp), "R"]
        if cp_names:
            wanted = cp_names
        fused = n.attrs.get("fused_parts") if n.kind == MATMUL else None
        if fused and lt_tp.get(parse_equation(n.attrs["equation"])[1][fused[0]]):
            wanted.insert(0, wanted[0] + PER_PART)          # a fused q|k|v or gate|up: each part column-parallel
        out[name] = list(dict.fromkeys(wanted))
    return out


def _boundary_spec(shape: tuple[int, ...], cfg: Config3D, mesh: Mesh, sp: bool) -> tuple[int, ...]:
    """The layout a stage's input arrives in: the batch split over dp; with context parallelism
    the sequence (dim 1) over cp; with sequence parallelism also the first other dim that
    divides split over tp, the dim a row-parallel linear's reduce-scatter splits
    (rules/einsum.py)."""
    dpm, cpm, tpm = cfg.axis_masks()
    spec = [0] * len(shape)
    if dpm and shape and shape[0] % mesh.factor(dpm) == 0:
        spec[0] = dpm
    if cpm and len(shape) >= 3 and shape[1] % mesh.factor(cpm) == 0:
        spec[1] = cpm
    if sp and tpm:
        d = next((i for i, n in enumerate(shape) if spec[i] == 0 and n % mesh.factor(tpm) == 0), None)
        if d is not None:
            spec[d] = tpm
    return tuple(spec)


def _device_ids_for(stage_rank: int, n: int) -> list[int]:
    return list(range(stage_rank * n, (stage_rank + 1) * n))


def _submesh_for(n_devices: int, cluster: Cluster) -> tuple[int, int]:
    m = cluster.gpus_per_node
    return (1, n_devices) if n_devices <= m else (n_devices // m, m)


def build_3d(source, cluster: Cluster, global_batch: int, cfg: Config3D, dtype: str | None = None,
             label: str | None = None, eager: bool = EAGER_DEFAULT, grad_sync: str | None = None,
             loss: str = "fused", checkpoint_early_stop: bool = True, tp_comm_overlap: bool = False) -> Plan:
    """A Megatron-style plan, evaluated (with `eager`, as the eager PyTorch recipe runs it,
    `grad_sync`'s gradient buckets, the `loss` kernel, full recomputation with or without
    torch's early stop, and Megatron-Core's overlapped tensor-parallel collectives: see
    autopar.evaluation.evaluator.evaluate)."""
    plan, graph = _unevaluated_3d(source, cluster, global_batch, cfg, dtype, label)
    return evaluate(plan, graph, cluster, eager=eager, grad_sync=grad_sync, loss=loss,
                    checkpoint_early_stop=checkpoint_early_stop, tp_comm_overlap=tp_comm_overlap)


def build_3d_recomputes(source, cluster: Cluster, global_batch: int, cfg: Config3D, recomputes: tuple[str, ...],
                        dtype: str | None = None, label: str | None = None) -> list[Plan]:
    """`build_3d` of `cfg` under each recomputation setting, its stages' strategies chosen once
    (they do not depend on it)."""
    plans, graph = unevaluated_recomputes(source, cluster, global_batch, cfg, recomputes, dtype, label)
    return [evaluate(p, graph, cluster) for p in plans]


def unevaluated_recomputes(source, cluster: Cluster, global_batch: int, cfg: Config3D, recomputes: tuple[str, ...],
                           dtype: str | None = None, label: str | None = None) -> tuple[list[Plan], OpGraph]:
    """The plans `build_3d_recomputes` evaluates, before the evaluator has run."""
    plan, graph = _unevaluated_3d(source, cluster, global_batch, cfg, dtype, label)
    out = []
    for rc in recomputes:
        c = dataclasses.replace(cfg, recompute=rc)
        check_config(c, cluster, global_batch, len(graph.layers) - 2, plan.training.dtype)
        stages = [dataclasses.replace(st, recompute=rc, recompute_layers=_recompute_layers(c, *st.layers))
                  for st in plan.stages]
        config = PlanConfig("megatron", c.label(), _settings(c))
        out.append(dataclasses.replace(plan, stages=stages, config=config))
    return out, graph


def step_lower_bound_s(plan: Plan, graph: OpGraph, cluster: Cluster, eager: bool = EAGER_DEFAULT,
                       memo: dict | None = None) -> float:
    """A step time no schedule of `plan` beats, from its stages' costs alone (no pipeline
    simulation): the evaluator's step is, on the slowest pipeline rank, the end of the rank's
    last op plus its gradient sync, optimizer step and bucket copies; the rank runs every
    microbatch's forward and backward of each stage (chunk) it hosts one after another
    (evaluation/pipeline.py), so that end is at least their sum.

    `memo` (shared across calls on one graph) reuses the costs of a stage whose layers are
    structurally identical to one seen before, entered alike, on the same mesh, with the same
    strategy at every position and the same recomputation: the same stage problem."""
    tr = plan.training
    cm = ComputeModel(cluster.gpu, tr.dtype)
    ranks = len(plan.stages) // tr.virtual_stages if tr.schedule == "interleaved" else len(plan.stages)
    per_rank = [0.0] * ranks
    last = len(graph.layers)
    for i, st in enumerate(plan.stages):
        key = None
        if memo is not None:
            a, b = st.layers
            names = stage_nodes(graph, st.layers)
            key = (id(graph), tuple(graph.layers[j].structural_hash for j in range(a, b)), a == 0, b == last,
                   st.submesh, tuple(st.logical_mesh), st.input_spec, st.recompute, st.recompute_layers,
                   tuple(st.strategies.get(n) for n in names), tr, eager)
        cost = memo.get(key) if memo is not None else None
        if cost is None:
            r = evaluate_stage(graph, cluster, st, tr, cm, eager)
            cost = (tr.n_microbatches * (r.fwd_s + r.bwd_s), r.sync_s + r.optimizer_s + r.grad_bucket_s)
            if memo is not None:
                memo[key] = cost
        per_rank[i % ranks] += cost[0] + cost[1]
    return max(per_rank)


def _settings(cfg: Config3D) -> dict:
    """The plan file's config settings: recompute_num_layers only where set, so that plans
    without it are written as before the option."""
    settings = dataclasses.asdict(cfg)
    if settings["recompute_num_layers"] is None:
        del settings["recompute_num_layers"]
    return settings


def _recompute_layers(cfg: Config3D, a: int, b: int) -> int | None:
    """A stage [a, b)'s recompute_layers for Megatron's first N blocks: the planner's layers
    count the embedding (layer 0) as a layer before the first block; None where that covers
    every layer."""
    if cfg.recompute != "full" or cfg.recompute_num_layers is None:
        return None
    k = cfg.recompute_num_layers + (a == 0)
    return k if k < b - a else None


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
    sub = Submesh(*_submesh_for(cfg.stage_devices, cluster))
    mesh = Mesh(cluster, sub, cfg.mesh_shape())
    sp = cfg.sequence_parallel and cfg.tp > 1
    stages = []
    for g, (a, b) in enumerate(ranges):
        names = stage_nodes(graph, (a, b))
        bsrc = main_boundary(graph, names)
        bspec: tuple[int, ...] = ()
        if bsrc is not None:
            bspec = _boundary_spec(graph.node(bsrc).out_shape, cfg, mesh, sp)
        offered = decision_names(graph, names, mesh, cm)
        wanted = megatron_names(graph, names, cfg.dp, cfg.tp, cfg.cp)
        chosen = {}
        for root, have in offered.items():
            if root not in wanted:
                continue
            pick = next((w for w in wanted[root] if w in have), None)
            if pick is None:
                if cfg.cp > 1 and any(CP_SUFFIX in w or "s@" in w for w in wanted[root]):
                    raise PlanError(f"cp={cfg.cp}: {root} cannot split its sequence over {cfg.cp} GPUs on mesh "
                                    f"{mesh.shape} (offered: {', '.join(have)}); causal attention needs the "
                                    f"sequence to divide into 2*cp chunks")
                pick = have[0]
            if sp:      # the reduce-scatter variant of a row-parallel linear or vocab-parallel embedding
                pick = next((h for h in have if h.startswith(pick + "+rs:")), pick)
            chosen[root] = pick
        stages.append(StagePlan(index=g, layers=(a, b), layer_names=[graph.layers[i].name for i in range(a, b)],
                                submesh=(sub.n_nodes, sub.gpus_per_node),
                                device_ids=_device_ids_for(g % cfg.pp, cfg.stage_devices),
                                logical_mesh=cfg.mesh_shape(), strategies=chosen,
                                input_spec=spec_str(bspec) if bsrc else "", recompute=cfg.recompute,
                                recompute_layers=_recompute_layers(cfg, a, b)))
    plan = Plan(strategy=label or "3d", config=PlanConfig("megatron", cfg.label(), _settings(cfg)),
                model=ModelInfo.of(graph, source.name, source.loadable), cluster=ClusterInfo.of(cluster), training=training,
                stages=stages)
    return plan, graph
