"""Lowering a plan to PyTorch's own parallel engines (issue 12): the runtime as a thin layer.

A stage whose per-op strategies are Megatron's layout on its (dp, tp) mesh — every op split
over the batch on the data-parallel axis; column-parallel, row-parallel and head-parallel ops
and vocab-parallel embedding and head on the tensor-parallel axis (the naming of
evaluation.baselines.megatron_names) — runs on the zoo's nn.Module with

    data parallelism   DistributedDataParallel (bucketed all-reduce overlapped with the
                       backward, no_sync between microbatches)
    ZeRO-1/2/3         FSDP2 fully_shard per block + root, reshard_after_forward for ZeRO-3,
                       MixedPrecisionPolicy(bf16 params, fp32 reduce) for bf16 runs; over
                       microbatches ZeRO-1 reduce-scatters once per step, ZeRO-2 every
                       microbatch, ZeRO-1/2 gather once per step (_fsdp_accumulation)
    Megatron TP        parallelize_module: ColwiseParallel / RowwiseParallel, vocab-parallel
                       embedding, loss_parallel for the vocab-split head; dp x tp on one
                       DeviceMesh with named dims ("pp", "dp", "tp")
    Megatron SP        the planner's reduce-scatter variants ("k@1+rs:s@1", "v@1+rs:s@1"; onto
                       the batch dim "rs:b@1" the same way), also in pipelines of like stages (each tp rank's chunk of
                       a boundary tensor goes to the same tp rank of the next stage): SequenceParallel
                       norms, ColwiseParallel(input_layouts=Shard(d)), RowwiseParallel(
                       output_layouts=Shard(d)), the embedding RowwiseParallel(output_layouts=
                       Shard(d))
    hidden-split       an embedding split over tp on its hidden dim ("h@1"): ColwiseParallel on
    embedding          the nn.Embedding (output all-gathered); a tied head reads its table
                       redistributed to rows (vocab-split head) or whole
    context            (dp x cp stages, CUDA) DDP / FSDP2 over the dp x cp ranks and torch's
    parallelism        context_parallel around each microbatch: tokens and position tables
                       sharded in its load-balanced order, ring attention (runtime.context)
    pipelines          torch.distributed.pipelining: one PipelineStage per stage, GPipe /
                       1F1B, and Interleaved1F1B with several stages (chunks) per rank;
                       stages of different device counts or (dp, tp) layouts on
                       runtime.pipeline.P2PPipeline (1F1B / GPipe order over batched point-to-point
                       ops, boundary rows resharded between the stages' meshes), as
                       torch's stages pair one rank per stage

Under tp an embedding or the head may instead be replicated, as the auto planner often
chooses. The modules run eagerly or compiled per transformer block (`compile`, every stage kind:
recompute_and_compile; by default, on CUDA, tensor-parallel stages, stages on one device (a
pipeline's or the whole plan), where it was measured to help, not DDP (slower where the host
bounds the step), FSDP2 or context-parallel ones: costmodel.eager.COMPILED_BY_ENGINE,
default_compile decides); nothing
is interpreted op by op. Without ZeRO the optimizer steps the parameters' local shards (ShardOptimizer: fused Adam, no DTensor
dispatch). A plan with a stage that matches no engine keeps the fx/DTensor program of
runtime.apply, with a warning that names the stage and op; with `compile` (by default on CUDA)
that program runs each layer as one torch.compile'd region (runtime.program.CompiledBlock).

Not lowered here (they keep the program path, or its NotAppliableError): interleaved schedules
over stages of different layouts or device groups of different sizes (the program runs them, the
latter on runtime.pipeline.P2PPipeline), expert-parallel / 2-D sharded weights (MoE under
TP), hf: models, sequence parallelism in mixed pipelines or on some row-parallel ops only, other
reduce-scatters, context parallelism beside tp or in pipelines, and on CPU (runtime.context),
layouts other than Megatron's. A vocab-split embedding
reduce-scattered onto the batch over the data-parallel axis ("v@1+rs:b@1" on a dp stage) runs
as the data-parallel lookup (see match_stage). The compiled program traces, per layer, the
joint forward+backward with the plan's redistributions as functional collectives and hands it to
Inductor; what it does not yet do: one graph per stage, Inductor's comm bucketing and reordering
passes for overlap (measure first: bench/runtime_vs_native.py --program).
"""

from __future__ import annotations

import contextlib
import copy
import types
import warnings
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from autopar.costmodel.eager import COMPILED_BY_ENGINE, compiled_per_block
from autopar.evaluation.baselines import megatron_names
from autopar.plan import Plan, PlanError
from autopar.sharding.rules.attention import CP_SUFFIX, cp_of
from autopar.sharding.rules.common import strategy_letters
from graphs.ir import ATTENTION, EMBEDDING, INPUT, MATMUL, OpGraph
from graphs.query import stage_nodes

from .apply import ParallelModel, build_model, check_plan_matches, pipeline_groups, trace_model, zoo_inputs
from .apply import apply as apply_program
from .layout import is_dtensor, placements, spec_of
from .optim import make_optimizer
from .pipeline import P2PPipeline, sum_tied_grad
from .program import NotAppliableError

# per family: (embedding modules, final norm, attention projections (column, row), MLP (column, row))
FAMILY_MODULES = {
    "gpt": (("wte", "wpe"), "ln_f", (("attn.q", "attn.k", "attn.v"), ("attn.proj",)),
            (("mlp.fc1",), ("mlp.fc2",))),
    "llama": (("tok_emb",), "norm", (("attn.wq", "attn.wk", "attn.wv"), ("attn.wo",)),
              (("mlp.w1", "mlp.w3"), ("mlp.w2",))),
}
FAMILY_MODULES["moe"] = FAMILY_MODULES["gpt"]
# per family: the norms of a block (sequence-parallel under Megatron's sequence parallelism)
BLOCK_NORMS = {"gpt": ("ln1", "ln2"), "llama": ("attn_norm", "mlp_norm")}
# the dim a reduce-scatter variant ("+rs:s@1") splits the residual stream over, by its letter
RS_DIMS = {"b": 0, "s": 1}
TP_FAMILIES = ("gpt", "llama")      # MoE's experts are bare parameters: no tensor-parallel engine


class EngineMismatch(Exception):
    """The plan's layout matches no engine; the message names the stage and op."""


@dataclass(frozen=True)
class StageLayout:
    """The engines one stage runs on: its (dp, tp) sizes, which logical mesh axis is dp, and
    under tp which embeddings (module names) and whether the head are split over the vocab
    (the others are replicated)."""
    dp: int
    tp: int
    dp_axis: int
    split_embeddings: tuple[str, ...] = ()
    split_head: bool = False
    sequence_dim: int | None = None      # under sequence parallelism: the dim of the residual
                                         # stream split over tp between blocks (0 batch, 1 sequence)
    rs_embeddings: tuple[str, ...] = ()  # split embeddings reduce-scattered onto sequence_dim
    hidden_split_embeddings: tuple[str, ...] = ()   # embeddings split over tp on the hidden dim
    rows_head_dim: int | None = None     # under tp: the head splits this token dim (0 batch, 1 sequence)
                                         # over tp, with the whole weight
    cp: int = 1                          # context parallelism: the sequence split over the other axis
    dp_vocab_head: bool = False          # tp 1: the head split over the vocab across the dp ranks,
                                         # every rank's tokens gathered (Segment._dp_vocab_head_loss)
    cp_exchange: str = ""                # its K/V exchange, "ring" or "allgather" (rules.attention)
    sharded_modules: tuple[str, ...] = ()  # ZeRO-1/2: modules whose parameters are stored sharded (ZeRO-3)

    @property
    def mesh_dims(self) -> tuple[str, str]:
        other = "cp" if self.cp > 1 else "tp"
        return ("dp", other) if self.dp_axis == 0 else (other, "dp")


# ---------------------------------------------------------------------------------------------
# matching a plan against the engines' layouts

def _swap_axes(name: str) -> str:
    return ",".join(t.replace("@0", "@x").replace("@1", "@0").replace("@x", "@1") if not t.endswith("@01") else t
                    for t in name.split(","))


def _vocab_ops(ir: OpGraph, names: list[str]) -> dict[str, str]:
    """Embedding lookups and the head's matmul among `names`: op name -> the module of its weight."""
    out = {}
    last = set(ir.layers[-1].nodes)
    for n in names:
        node = ir.node(n)
        param = next((o.param for o in node.operands if o.param), None)
        if param and (node.kind == EMBEDDING or (node.kind == MATMUL and n in last)):
            out[n] = param.rpartition(".")[0]
    return out


def _row_parallel_ops(ir: OpGraph, names: list[str], family: str) -> set[str]:
    """The row-parallel matmuls among `names` (attention-out and MLP-out of a block)."""
    _, _, (_, attn_row), (_, mlp_row) = FAMILY_MODULES[family]
    rows = set(attn_row + mlp_row)
    out = set()
    for n in names:
        node = ir.node(n)
        param = next((o.param for o in node.operands if o.param), None)
        if node.kind == MATMUL and param and param.startswith("blocks."):
            module = param.rpartition(".")[0].split(".", 2)[2]          # blocks.3.attn.proj -> attn.proj
            if module in rows:
                out.add(n)
    return out


def match_stage(plan: Plan, ir: OpGraph, k: int, family: str) -> StageLayout:
    """The engines' layout of stage k, or EngineMismatch naming the first op that differs. The
    data inputs' layout is free (each rank loads its rows), and under tp an embedding or the
    head may be replicated instead of vocab-split.

    Megatron's sequence parallelism: every row-parallel matmul reduce-scatters onto one dim of
    the residual stream ("k@1+rs:s@1"; the batch dim "rs:b@1" the same way), a vocab-split
    embedding may too ("v@1+rs:s@1"); only in a one-stage plan (the pipeline's boundary tensors
    are whole). A vocab-split embedding reduce-scattered onto the batch over the data-parallel
    axis ("v@1+rs:b@1" with dp on axis 1, tp 1) is the data-parallel lookup with its table split
    over dp: it runs as the data-parallel embedding (FSDP shards the table's vocab dim under
    ZeRO), the same numbers with the weight gathered instead of the output reduce-scattered."""
    stage = plan.stages[k]
    if family not in FAMILY_MODULES:
        raise EngineMismatch(f"stage {k}: model family {family!r} has no engine lowering")
    names = stage_nodes(ir, stage.layers)
    vocab = _vocab_ops(ir, names)
    if any(CP_SUFFIX in v for v in stage.strategies.values()):
        return _match_context_parallel(plan, ir, k, names, vocab)
    rows = _row_parallel_ops(ir, names, family)
    m0, m1 = tuple(stage.logical_mesh)
    misses = []
    for dp_axis in ((0, 1) if m0 != m1 or m0 > 1 else (0,)):
        dp, tp = (m0, m1) if dp_axis == 0 else (m1, m0)
        if tp > 1 and family not in TP_FAMILIES:
            misses.append(f"tensor parallelism over {tp} devices on a {family} model (expert weights)")
            continue
        tp_at, dp_at = f"@{1 - dp_axis}", f"@{dp_axis}"
        wanted = megatron_names(ir, names, dp, tp)
        dp_only = megatron_names(ir, list(vocab), dp, 1) if tp > 1 else {}
        bad, split, rs_dims, rs_ops, hidden, rows_heads = [], set(), set(), set(), set(), set()
        dp_heads: set[str] = set()
        for name, choices in wanted.items():
            have = stage.strategies.get(name)
            if have is None or ir.node(name).kind == INPUT:
                continue
            want = _swap_axes(choices[0]) if dp_axis == 1 else choices[0]
            base, _, scatter = have.partition("+rs:")
            if scatter and tp == 1 and dp > 1 and name in vocab and ir.node(name).kind == EMBEDDING \
                    and base == f"v{dp_at}" and scatter == f"b{dp_at}" and want == f"b{dp_at}":
                continue                                    # the data-parallel lookup (see above)
            if scatter:
                letter, at = scatter[:1], scatter[1:]
                if tp > 1 and at == tp_at and letter in RS_DIMS and base == want and (name in rows or name in split
                                                                                      or name in vocab):
                    rs_dims.add(RS_DIMS[letter])
                    rs_ops.add(name)
                    have = base
                else:
                    bad.append(f"op {name} is {have!r}, a reduce-scatter the engines do not lower")
                    continue
            if name in vocab and have == want:
                split.add(name)
            elif (name in vocab and ir.node(name).kind == EMBEDDING and f"v{tp_at}" in want
                    and have == want.replace(f"v{tp_at}", f"h{tp_at}")):
                hidden.add(name)                            # split on the hidden dim (ColwiseParallel)
            elif name in dp_only and have == (_swap_axes(dp_only[name][0]) if dp_axis == 1 else dp_only[name][0]):
                pass                                        # replicated over tp
            elif name in vocab and ir.node(name).kind == MATMUL and _token_split_head(have, dp, dp_axis) is not None:
                rows_heads.add(name)                        # the head on this rank's tokens, whole weight
            elif (tp == 1 and dp > 1 and name in vocab and ir.node(name).kind == MATMUL and have == f"n{dp_at}"
                    and want == f"b{dp_at}" and ir.node(name).out_shape[-1] % dp == 0):
                dp_heads.add(name)                          # the head split over the vocab across dp
            elif have != want:
                bad.append(f"op {name} is {have!r}, the engines need {want!r}")
        sequence_dim = None
        if not bad and rs_ops:
            plain_rows = sorted(rows - rs_ops)
            if len(rs_dims) > 1:
                bad.append(f"reduce-scatters onto different dims {sorted(rs_dims)} of the residual stream")
            elif plain_rows:
                bad.append(f"sequence parallelism on some row-parallel ops only: op {plain_rows[0]} all-reduces")
            else:
                sequence_dim = rs_dims.pop()
        if not bad and tp == 1:
            return StageLayout(dp, tp, dp_axis, dp_vocab_head=bool(dp_heads))
        rows_dims = {_token_split_head(stage.strategies[n], dp, dp_axis) for n in rows_heads}
        tokens = (plan.training.microbatch_size // dp, plan.model.seq)
        uneven = [d for d in rows_dims if d is not None and tokens[d] % tp]
        if not bad and uneven:
            bad.append(f"the head splits {tokens[uneven[0]]} {('rows', 'positions')[uneven[0]]} over tp={tp}")
        if not bad:
            heads = [n for n in vocab if ir.node(n).kind == MATMUL]
            if any(n in rs_ops for n in heads):
                bad.append("a reduce-scattered head")
            else:
                return StageLayout(dp, tp, dp_axis, tuple(sorted(vocab[n] for n in split if n not in heads)),
                                   any(n in split for n in heads), sequence_dim,
                                   tuple(sorted(vocab[n] for n in rs_ops if n in vocab)),
                                   tuple(sorted(vocab[n] for n in hidden)), rows_dims.pop() if rows_heads else None)
        misses.append(f"{len(bad)} op(s) differ from Megatron's layout with dp on mesh axis {dp_axis}, first: "
                      + bad[0])
    raise EngineMismatch(f"stage {k} (layers {list(stage.layers)}, mesh {m0}x{m1}): " + "; ".join(misses))


def _token_split_head(strategy: str, dp: int, dp_axis: int) -> int | None:
    """The token dim (0 batch, 1 sequence) a head's strategy splits over the tp axis, its batch
    also over dp where dp > 1 ("b@1", "s@1", "b@0,s@1", "b@01"); None for any other strategy."""
    tpm, dpm = 1 << (1 - dp_axis), (1 << dp_axis) if dp > 1 else 0
    letters = strategy_letters(strategy)
    if letters == {"b": tpm | dpm}:
        return 0
    if letters == {"s": tpm, **({"b": dpm} if dpm else {})}:
        return 1
    return None


def _match_context_parallel(plan: Plan, ir: OpGraph, k: int, names: list[str], vocab: dict[str, str]) -> StageLayout:
    """The layout of a context-parallel stage (runtime.context): Megatron's names for (dp, cp)
    (evaluation.baselines.megatron_names), the linears and the head splitting the sequence over
    the cp axis and every attention op exchanging K/V the same way. An embedding may take any
    layout: each rank looks up its own tokens, and the data-parallel engine keeps the table."""
    stage = plan.stages[k]
    m = tuple(stage.logical_mesh)
    misses = []
    for cp_axis in (0, 1):
        cp, dp = m[cp_axis], m[1 - cp_axis]
        if cp == 1:
            continue
        if len(plan.stages) > 1:
            misses.append("context parallelism across pipeline stages (boundary tensors split over the sequence)")
            break
        # megatron_names puts dp on axis 0 and cp on axis 1, or cp alone on axis 0
        swap = cp_axis == 0 if dp > 1 else cp_axis == 1
        wanted = megatron_names(ir, names, dp, 1, cp)
        bad, exchanges = [], set()
        for name, choices in wanted.items():
            have = stage.strategies.get(name)
            node = ir.node(name)
            if have is None or node.kind in (INPUT, EMBEDDING):
                continue
            options = [_swap_axes(c) if swap else c for c in choices]
            if have not in options[:1] and not (node.kind == ATTENTION and have in options):
                bad.append(f"op {name} is {have!r}, the context-parallel engine needs {options[0]!r}")
                continue
            found = cp_of(have) if node.kind == ATTENTION else None
            if found is not None:
                exchanges.add(found[1])
        seq = plan.model.seq
        if not bad and len(exchanges) != 1:
            bad.append(f"attention ops exchange K/V in different ways ({', '.join(sorted(exchanges))}); torch's "
                       "context_parallel takes one rotate method")
        if not bad and seq % (2 * cp):
            bad.append(f"a sequence of {seq} tokens does not split into 2 x {cp} load-balanced chunks")
        if not bad:
            return StageLayout(dp, 1, 1 - cp_axis, cp=cp, cp_exchange=exchanges.pop())
        misses.append(f"{len(bad)} op(s) differ with cp on mesh axis {cp_axis}, first: {bad[0]}")
    raise EngineMismatch(f"stage {k} (layers {list(stage.layers)}, mesh {m[0]}x{m[1]}): " + "; ".join(misses))


def _check_specs(plan: Plan) -> None:
    """Every op's specs must be layouts of its stage's mesh (as the program path requires)."""
    for s in plan.stages:
        for o in s.ops:
            for spec in [o.get("out_spec"), *(o.get("in_specs") or [])]:
                if spec and spec != "scalar":
                    try:
                        placements(spec, len(spec.replace("S01", "X").replace("S0", "X").replace("S1", "X")))
                    except ValueError as e:
                        raise PlanError(f"stage {s.index} op {o['name']}: {e}") from None


def pipeline_ranks(plan: Plan) -> int:
    """The pipeline's ranks: stage k runs on the (k mod pp)-th device group, as
    torch.distributed.pipelining's interleaved schedules place chunks (apply.pipeline_groups);
    EngineMismatch otherwise."""
    try:
        pp = max(pipeline_groups(plan)) + 1
    except NotAppliableError as e:
        raise EngineMismatch(str(e)) from None
    ids = [d for s in sorted(plan.stages, key=lambda s: s.index)[:pp] for d in s.device_ids]
    if len(set(ids)) != len(ids):
        raise EngineMismatch("device groups of the pipeline overlap")
    return pp


def is_mixed(plan: Plan, layouts: list[StageLayout]) -> bool:
    """Whether the stages differ in device count or (dp, tp) layout: such a pipeline runs on
    runtime.pipeline.P2PPipeline instead of torch.distributed.pipelining, which pairs one rank per stage."""
    return (len({len(s.device_ids) for s in plan.stages}) > 1
            or len({(x.dp, x.tp, x.dp_axis) for x in layouts}) > 1)


def _sharded_modules(plan: Plan, ir: OpGraph, k: int) -> tuple[str, ...]:
    """The modules owning the parameters of stage k's ops stored sharded (StagePlan.sharded_storage)."""
    out = set()
    for n in plan.stages[k].sharded_storage:
        if n not in ir:
            raise EngineMismatch(f"stage {k}: sharded_storage names {n!r}, not an op of the model")
        out |= {o.param.rpartition(".")[0] for o in ir.node(n).operands if o.is_param and o.owns_param and o.param}
    return tuple(sorted(out))


def match_plan(plan: Plan, ir: OpGraph, family: str) -> list[StageLayout]:
    """Per stage, its engines' layout; EngineMismatch when a stage or the schedule has none."""
    pp = pipeline_ranks(plan)
    layouts = [replace(match_stage(plan, ir, k, family), sharded_modules=_sharded_modules(plan, ir, k))
               for k in range(len(plan.stages))]
    mixed = is_mixed(plan, layouts)
    if mixed and pp != len(plan.stages):
        raise EngineMismatch("interleaved schedules over stages of different device counts or (dp, tp) layouts "
                             "are not lowered to engines (the DTensor program runs them)")
    # Under sequence parallelism the boundary tensors travel split over tp, each tp rank's chunk
    # to the same tp rank of the next stage: every stage must split the same dim, on one layout.
    dims = {x.sequence_dim for x in layouts}
    if len(plan.stages) > 1 and dims != {None}:
        if len(dims) > 1:
            k = next(k for k, x in enumerate(layouts) if x.sequence_dim != layouts[0].sequence_dim)
            raise EngineMismatch(f"sequence parallelism on some pipeline stages only: stage {k} splits dim "
                                 f"{layouts[k].sequence_dim} of its boundary tensors, stage 0 dim {layouts[0].sequence_dim}")
        if mixed:
            raise EngineMismatch("sequence parallelism in a pipeline of stages with different device counts or "
                                 "layouts (their boundary tensors would be resharded split)")
    mb = plan.training.microbatch_size
    for k, x in enumerate(layouts):
        if mb % x.dp:
            raise EngineMismatch(f"stage {k}: microbatch {mb} does not split over dp={x.dp}")
    return layouts


# ---------------------------------------------------------------------------------------------
# one stage of a zoo model as a module

class Segment(nn.Module):
    """Blocks [lo, hi) of a zoo model, with its embedding when first and its final norm, head
    and loss when last. Submodules keep the model's names (blocks.3.attn.q.weight, ...), so
    parameters are named as in the model. A last stage of a tied model that is not also the
    first holds its own copy of the embedding (gradients summed across the two stages)."""

    def __init__(self, model: Any, first: bool, last: bool, blocks: range, recompute: str = "none",
                 recompute_blocks: int | None = None):
        """recompute "full" checkpoints the first `recompute_blocks` blocks (None: all of them;
        Megatron's --recompute-method block), the rest keeping their activations."""
        super().__init__()
        cfg = model.cfg
        self.family, self.tied, self.first, self.last = cfg.family, cfg.tied, first, last
        self.recompute = recompute
        self.recompute_blocks = recompute_blocks
        # under context parallelism (GPT): the positions of this rank's tokens, a buffer that
        # torch's context_parallel shards as it shards the tokens
        self.register_buffer("cp_positions", None, persistent=False)
        self.head_mesh = None               # set when a tied head splits a replicated weight
        self.split_head = False             # the head split over the vocab (apply_tp)
        self.rows_head: tuple[Any, int] | None = None   # (tp mesh, token dim) of a head on this tp
                                                         # rank's tokens (apply_tp)
        self.dp_head: Any = None            # the dp mesh a head is split over by the vocab (tp 1)
        # under sequence parallelism (apply_tp): (tp mesh, split dim, reduce-scattered embeddings)
        self.sequence_split: tuple[Any, int, tuple[str, ...]] | None = None
        embeds, norm, _, _ = FAMILY_MODULES[cfg.family]
        self.embed_names, self.norm_name = embeds, norm
        if first:
            for n in embeds:
                setattr(self, n, getattr(model, n))
        elif last and cfg.tied:
            setattr(self, embeds[0], copy.deepcopy(getattr(model, embeds[0])))
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in blocks})
        self.checkpoint_around: set[str] = set()    # blocks checkpointed here, around their call
        if last:
            setattr(self, norm, getattr(model, norm))
            if not cfg.tied:
                self.head = model.head

    def recomputed_keys(self) -> list[str]:
        """The blocks recomputed whole: under full recomputation the first recompute_blocks."""
        if self.recompute != "full":
            return []
        return [k for i, k in enumerate(self.blocks) if self.recompute_blocks is None or i < self.recompute_blocks]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        m: Any = self
        if self.sequence_split is None:
            if self.family == "llama":
                return m.tok_emb(ids)
            pos = self.cp_positions if self.cp_positions is not None else torch.arange(ids.shape[1], device=ids.device)
            return m.wte(ids) + m.wpe(pos)
        # sequence parallel: this rank's chunk of the residual stream on the split dim. The sum
        # runs on DTensors so that the backward sums each position's gradient over the chunks
        # (the reduce-scattered lookup gives its chunk; a whole output is cut as Shard cuts)
        from torch.distributed.tensor import DTensor, Replicate, Shard
        mesh, dim, scattered = self.sequence_split
        first = self.embed_names[0]
        x: Any = DTensor.from_local(getattr(self, first)(ids), mesh, [Shard(dim) if first in scattered else Replicate()],
                               run_check=False)
        if self.family != "llama":
            pos = m.wpe(torch.arange(ids.shape[1], device=ids.device))
            x = x + DTensor.from_local(pos, mesh, [Replicate()], run_check=False)
        return x.redistribute(mesh, [Shard(dim)]).to_local()

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if self.first:
            x = self.embed(x)
        for key, block in self.blocks.items():
            if key in self.checkpoint_around and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)          # (a block recomputed otherwise checkpoints its own forward)
        if not self.last:
            return x
        x = getattr(self, self.norm_name)(x)
        if self.sequence_split is not None and is_dtensor(x):
            # the norm ran on its split of the sequence: gather it for the head
            from torch.distributed.tensor import Replicate
            gathered: Any = x
            gathered = gathered.redistribute(gathered.device_mesh, [Replicate()])
            x = gathered if self.split_head else gathered.to_local()
        assert targets is not None, "the last stage needs the targets"
        if self.rows_head is not None:
            return self._rows_head_loss(x, targets)
        if self.dp_head is not None:
            return self._dp_vocab_head_loss(x, targets)
        if self.tied:
            from torch.distributed.tensor import DTensor, Replicate, Shard
            w: Any = getattr(self, self.embed_names[0]).weight
            if self.head_mesh is not None:
                w = DTensor.from_local(w, self.head_mesh, [Replicate()], run_check=False).redistribute(
                    self.head_mesh, [Shard(0)])
            elif is_dtensor(w) and self.split_head and tuple(w.placements) != (Shard(0),):
                w = w.redistribute(w.device_mesh, [Shard(0)])       # a hidden-split table, split by rows
            elif is_dtensor(w) and not self.split_head:
                w = w.full_tensor()                                 # a hidden-split table, whole
            logits = F.linear(x, w)
        else:
            logits = cast(Any, self).head(x)
        loss: Any = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        # a vocab-parallel loss is a replicated DTensor: every rank holds the whole value; one
        # element, not a scalar, as pipelining concatenates the microbatches' outputs
        return (loss.to_local() if is_dtensor(loss) else loss).reshape(1)

    def _rows_head_loss(self, x: Any, targets: torch.Tensor) -> torch.Tensor:
        """The head and loss on this tp rank's share of the tokens (its rows of the batch, or its
        chunk of the sequence), with the whole weight: the planner's token-split head under tp.
        Backward: the tokens' input gradients are all-gathered, the weight's per-rank gradients
        summed (Partial) into its layout; the value returned is the whole microbatch's loss, the
        gradient this rank's share of it."""
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
        assert self.rows_head is not None
        mesh, dim = self.rows_head
        n = mesh.size()
        whole = x.redistribute(mesh, [Replicate()]) if is_dtensor(x) else \
            DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        rows = whole.redistribute(mesh, [Shard(dim)]).to_local()
        w: Any = getattr(self, self.embed_names[0]).weight if self.tied else cast(Any, self).head.weight
        if not is_dtensor(w):
            w = DTensor.from_local(w, mesh, [Replicate()], run_check=False)
        w = w.redistribute(w.device_mesh, [Replicate()] * w.device_mesh.ndim).to_local(
            grad_placements=[Partial()] * w.device_mesh.ndim)
        logits = F.linear(rows, w)
        mine = targets.chunk(n, dim=dim)[mesh.get_local_rank()]          # as Shard(dim) cuts
        share = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mine.reshape(-1)) / n
        total = share.detach().clone()
        dist.all_reduce(total, group=mesh.get_group())
        return (share + (total - share.detach())).reshape(1)

    def _dp_vocab_head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The head split over the vocab across the data-parallel ranks (the planner's "n@dp"
        head beside batch-split blocks): every rank's tokens gathered, each rank's logits for
        its share of the vocab, the loss vocab-parallel (loss_parallel, entered by
        EngineModel._contexts). The value is the mean over all the ranks' tokens. Backward: the
        inputs' gradients are reduce-scattered back to their rows and scaled by dp, because the
        blocks' gradients are then averaged over dp (DDP / FSDP2) while this rank's rows carry
        their whole share of the loss's gradient; the head's own gradient is exact as it stands.
        An untied head holds its vocab shard (EngineModel); a tied table is split here."""
        from torch.distributed.tensor import DTensor, Replicate, Shard
        mesh = self.dp_head
        whole = DTensor.from_local(_ScaleGrad.apply(x, float(mesh.size())), mesh, [Shard(0)],
                                   run_check=False).redistribute(mesh, [Replicate()])
        w: Any = getattr(self, self.embed_names[0]).weight if self.tied else cast(Any, self).head.weight
        if not is_dtensor(w):
            w = DTensor.from_local(w, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(0)])
        if not torch.is_autocast_enabled() and w.dtype != whole.dtype:
            w = w.to(whole.dtype)                       # FSDP2's policy cast the blocks, not this shard
        logits = F.linear(whole, w)                     # Shard(-1): this rank's vocab
        all_targets = DTensor.from_local(targets, mesh, [Shard(0)], run_check=False).full_tensor()
        loss: Any = F.cross_entropy(logits.view(-1, logits.shape[-1]), all_targets.reshape(-1))
        return (loss.to_local() if is_dtensor(loss) else loss).reshape(1)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g * ctx.scale, None


def recomputed_blocks(stage: Any, n_blocks: int) -> int | None:
    """How many of a stage's blocks its recompute_layers covers: the blocks among its first k
    IR layers (the embedding, layer 0, is not a block); None where it recomputes all layers."""
    k = stage.recompute_layers
    if k is None:
        return None
    a = stage.layers[0]
    return len(segment_blocks((a, a + k), n_blocks)[2]) if k else 0


def segment_blocks(layers: tuple[int, int], n_blocks: int) -> tuple[bool, bool, range]:
    """(first, last, block indices) of IR layers [a, b): layer 0 embeds, 1..L are the blocks,
    L+1 is the head."""
    a, b = layers
    return a == 0, b == n_blocks + 2, range(max(a, 1) - 1, min(b, n_blocks + 1) - 1)


# ---------------------------------------------------------------------------------------------
# the engines

def _gpt_attention_tp(self, x: torch.Tensor) -> torch.Tensor:
    """GPT attention on this rank's heads: the column-parallel q/k/v give heads/tp heads."""
    b, s, _ = x.shape
    q = self.q(x).view(b, s, -1, self.head_dim).transpose(1, 2)
    k = self.k(x).view(b, s, -1, self.head_dim).transpose(1, 2)
    v = self.v(x).view(b, s, -1, self.head_dim).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.proj(y.transpose(1, 2).reshape(b, s, -1))


def apply_tp(seg: Segment, tp_mesh, split_embeddings: tuple[str, ...], split_head: bool,
             sequence_dim: int | None = None, rs_embeddings: tuple[str, ...] = (),
             hidden_split_embeddings: tuple[str, ...] = (), rows_head_dim: int | None = None) -> None:
    """Megatron tensor parallelism over tp_mesh: column-parallel q/k/v and MLP-in, row-parallel
    attention-out and MLP-out; the embeddings named in split_embeddings vocab-parallel, and
    with split_head the head too (its loss under loss_parallel). With sequence_dim, Megatron's
    sequence parallelism: between blocks the residual stream is split over tp on that dim, the
    norms run on their split (SequenceParallel), column-parallel ops all-gather it and
    row-parallel ops reduce-scatter onto it; the embeddings in rs_embeddings reduce-scatter
    onto it, the others' whole output is split in Segment.embed. The embeddings in
    hidden_split_embeddings are split on the hidden dim (ColwiseParallel, output all-gathered)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )
    tp = tp_mesh.size()
    _, _, (attn_col, attn_row), (mlp_col, mlp_row) = FAMILY_MODULES[seg.family]
    sp = sequence_dim is not None
    between: Any = Shard(sequence_dim) if sequence_dim is not None else Replicate()
    for block in seg.blocks.values():
        plan: dict[str, Any] = {n: ColwiseParallel(input_layouts=between) for n in attn_col + mlp_col}
        plan.update({n: RowwiseParallel(output_layouts=between) for n in attn_row + mlp_row})
        if sequence_dim is not None:
            plan.update({n: SequenceParallel(sequence_dim=sequence_dim) for n in BLOCK_NORMS[seg.family]})
        parallelize_module(block, tp_mesh, plan)
        attn: Any = block.attn
        attn.heads //= tp
        if seg.family == "llama":
            attn.kv_heads //= tp                  # its forward views by self.heads / kv_heads
        else:
            attn.forward = types.MethodType(_gpt_attention_tp, attn)
    top: dict[str, Any] = {}
    for n in seg.embed_names:
        if hasattr(seg, n) and n in split_embeddings:
            # vocab-parallel lookup, all-reduced or reduce-scattered onto the split residual stream
            top[n] = RowwiseParallel(input_layouts=Replicate(),
                                     output_layouts=between if n in rs_embeddings else Replicate())
        elif hasattr(seg, n) and n in hidden_split_embeddings:
            top[n] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if sequence_dim is not None:
        seg.sequence_split = (tp_mesh, sequence_dim, tuple(n for n in rs_embeddings if hasattr(seg, n)))
        if seg.last:
            # the final norm on its split; Segment.forward gathers its output for the head
            top[seg.norm_name] = SequenceParallel(sequence_dim=sequence_dim)
    seg.split_head = seg.last and split_head
    if seg.last and rows_head_dim is not None:
        seg.rows_head = (tp_mesh, rows_head_dim)
    if seg.last and split_head:
        if seg.tied and sp:
            if seg.embed_names[0] not in split_embeddings + hidden_split_embeddings:
                seg.head_mesh = tp_mesh        # the replicated weight is split at the head
        elif seg.tied:
            # the head reads the embedding's weight: its input must be a DTensor
            top[seg.norm_name] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Replicate(),
                                                     use_local_output=False)
            if seg.embed_names[0] not in split_embeddings + hidden_split_embeddings:
                seg.head_mesh = tp_mesh        # the replicated weight is split at the head
        else:
            top["head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    elif seg.last and seg.tied and seg.embed_names[0] in split_embeddings:
        raise EngineMismatch("a vocab-split embedding tied to a replicated head is not lowered to engines")
    parallelize_module(seg, tp_mesh, top)


def apply_fsdp(seg: nn.Module, blocks: list[nn.Module], dp_mesh, zero: int, param_dtype: torch.dtype | None,
               ignored: set[nn.Parameter] | None = None, sharded: tuple[nn.Module, ...] = ()) -> None:
    """FSDP2: one unit per block and the root. ZeRO-3 frees each block's gathered weights after
    its forward (the last block's backward follows at once, so it keeps them); ZeRO-1/2 keep
    them to the backward. `ignored`: parameters sharded otherwise (a head split over dp).
    `sharded`: modules stored as under ZeRO-3 in a ZeRO-1/2 stage (per-op sharded storage),
    each a unit of its own inside its block that frees its weights after its forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype
          else MixedPrecisionPolicy())
    for m in sharded:
        fully_shard(m, mesh=dp_mesh, reshard_after_forward=True, mp_policy=mp)
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=zero >= 3 and i < len(blocks) - 1, mp_policy=mp)
    kw: dict[str, Any] = {"ignored_params": ignored} if ignored else {}     # (an argument since torch 2.7)
    fully_shard(seg, mesh=dp_mesh, reshard_after_forward=zero >= 3, mp_policy=mp, **kw)


def stage_zero(layout: StageLayout, zero: int) -> int:
    """The ZeRO level a stage of `layout` runs under a plan's `zero`: FSDP2 over its dp x cp
    replicas where it has several, none on a stage without replicas (EngineModel and
    default_compile both ask)."""
    return zero if layout.dp * layout.cp > 1 else 0


def default_compile(layout: StageLayout, device: torch.device, zero: int = 0) -> bool:
    """Compile where it was measured to help: the one rule, costmodel.eager.compiled_per_block,
    which the eager cost model prices too, for a stage of `layout` (on dp x tp x cp devices)
    under a plan's ZeRO level `zero` (FSDP2 where `stage_zero` says so). Never on CPU, where
    Inductor builds C++ per block and nothing was measured (`autopar run --compile` forces it)."""
    return compiled_per_block(layout.tp, device.type == "cuda", stage_devices=layout.dp * layout.tp * layout.cp,
                              fsdp2=stage_zero(layout, zero) > 0, context_parallel=layout.cp > 1)


def default_compile_text() -> str:
    """default_compile in words (autopar run's help and report)."""
    kinds = {"plain": "stages on one device", "ddp": "DDP stages", "fsdp2": "FSDP2 (ZeRO) stages",
             "context_parallel": "context-parallel stages"}
    return ", ".join(["tensor-parallel stages"] + [kinds[k] for k, on in COMPILED_BY_ENGINE.items() if on]) + ", on cuda"


def recompute_and_compile(seg: Segment, compile: bool, tensor_parallel: bool) -> None:
    """The stage's recomputation, and with `compile` torch.compile per transformer block
    (torchtitan's granularity), in place so names stay; before FSDP2 wraps the blocks. The
    backend is the compiled program's (runtime.program.compile_backend: Inductor).

    torchtitan's order: the checkpoint inside the compiled block (the compiler traces it and
    recomputes what it marks), the block inside FSDP2's unit (one gather serves forward and
    recompute). On tensor-parallel blocks torch (2.13) cannot trace a checkpoint over DTensors
    (AOTAutograd saves their DeviceMesh: "expected all tensors_saved_with_vc_check to be
    Tensors"), so there the checkpoint goes around the compiled code: a block recomputed whole is
    checkpointed around its compiled call (Segment.forward), and under selective recomputation
    the attention module is compiled on its own inside its checkpoint and the MLP on its own."""
    from .program import compile_backend
    backend = compile_backend() if compile else None
    around = compile and tensor_parallel
    whole = set(seg.recomputed_keys())
    for key, block in seg.blocks.items():
        if seg.recompute == "selective":
            attn: Any = block.attn
            if around:
                _checkpoint_forward(attn, backend)
                cast(Any, block).mlp.compile(backend=backend)
                continue
            _checkpoint_forward(attn)
        if key in whole:
            if around:
                seg.checkpoint_around.add(key)
            else:
                _checkpoint_forward(block)
        if compile:
            block.compile(backend=backend)


# ---------------------------------------------------------------------------------------------

class EngineModel:
    """One rank's share of a plan lowered to engines; the interface of ParallelModel. With an
    interleaved schedule a rank runs several stages (chunks) of the pipeline."""

    def __init__(self, plan: Plan, model: Any, layouts: list[StageLayout], device: torch.device,
                 optimizer: str = "adam", lr: float = 1e-3, autocast_dtype: torch.dtype | None = None,
                 compile: bool | None = None):
        self.plan, self.device = plan, torch.device(device)
        self.cfg = model.cfg
        stages = sorted(plan.stages, key=lambda s: s.index)
        self.n_stages = len(stages)
        self.pp = pipeline_ranks(plan)
        # A mixed pipeline (stages of different sizes or layouts) has one stage per device group,
        # its ranks in stage order; a uniform one places stage k on rank group k mod pp.
        self.mixed = is_mixed(plan, layouts)
        sizes = [len(s.device_ids) for s in stages]
        self.stage_offsets = [sum(sizes[:k]) for k in range(self.n_stages)]
        self.stage_sizes = sizes
        n = sizes[0]
        distributed = dist.is_available() and dist.is_initialized()
        world = sum(sizes) if self.mixed else self.pp * n
        if distributed and dist.get_world_size() != world:
            raise PlanError(f"the plan runs on {world} devices, the process group has {dist.get_world_size()} ranks")
        if not distributed and world > 1:
            raise PlanError(f"the plan runs on {world} devices: call apply() on every rank of an initialised "
                            "torch.distributed process group (autopar run does that)")
        self.rank = dist.get_rank() if distributed else 0
        if self.mixed:
            self.pp_rank = max(k for k, o in enumerate(self.stage_offsets) if o <= self.rank)
            self.local_index = self.rank - self.stage_offsets[self.pp_rank]
        else:
            self.pp_rank, self.local_index = divmod(self.rank, n)
        self.stage_ids = [k for k in range(self.n_stages) if k % self.pp == self.pp_rank]
        self.stage_index = self.stage_ids[0]
        self.stage = stages[self.stage_index]
        self.layout = layout = layouts[self.stage_index]
        self.last_layout = layouts[self.stage_ids[-1]]      # its last chunk's (under interleaving)
        self.zero = stage_zero(layout, plan.training.zero)
        if compile is None:
            compile = default_compile(layout, self.device, plan.training.zero)
        self.compiled = compile
        self.n_microbatches = plan.training.n_microbatches
        self.microbatch_size = plan.training.microbatch_size
        self.local_mb = self.microbatch_size // layout.dp

        # Collective setup, the same calls in the same order on every rank.
        self.mesh = None
        if self.mixed:
            # every rank builds every stage's mesh (creating process groups is collective)
            from torch.distributed.device_mesh import DeviceMesh
            for k, (s, x) in enumerate(zip(stages, layouts)):
                if len(s.device_ids) > 1:
                    ranks = torch.arange(self.stage_offsets[k], self.stage_offsets[k] + len(s.device_ids))
                    mesh = DeviceMesh(self.device.type, ranks.view(*s.logical_mesh), mesh_dim_names=x.mesh_dims)
                    if k == self.pp_rank:
                        self.mesh = mesh
        elif world > 1:
            from torch.distributed.device_mesh import init_device_mesh
            m0, m1 = tuple(self.stage.logical_mesh)
            self.mesh = init_device_mesh(self.device.type, (self.pp, m0, m1), mesh_dim_names=("pp", *layout.mesh_dims))
        self.dp_mesh = self.mesh["dp"] if self.mesh is not None and layout.dp > 1 else None
        self.tp_mesh = self.mesh["tp"] if self.mesh is not None and layout.tp > 1 else None
        self.dp_rank = self.dp_mesh.get_local_rank() if self.dp_mesh is not None else 0
        # the ranks that hold the same weights and average their gradients: dp, or dp x cp
        # under context parallelism (each cp rank's loss is the mean over its share of the tokens)
        self.cp_mesh = self.mesh["cp"] if self.mesh is not None and layout.cp > 1 else None
        self.replica_mesh = self.dp_mesh
        if self.cp_mesh is not None:
            assert self.mesh is not None
            self.replica_mesh = self.mesh["dp", "cp"]._flatten("dp_cp") if layout.dp > 1 else self.cp_mesh
            _set_rotate_method(layout.cp_exchange)
        self.tied_group = None
        tied_ranks = sorted({0, (self.n_stages - 1) % self.pp})
        if self.mixed and model.cfg.tied:
            # the first and last stages' copies of the embedding, whatever their layouts: their
            # full gradients are summed over all ranks of both stages (see _reduce_grads)
            last = self.n_stages - 1
            both = [r for k in (0, last) for r in range(self.stage_offsets[k], self.stage_offsets[k] + sizes[k])]
            g = dist.new_group(both)
            if self.pp_rank in (0, last):
                self.tied_group = g
        elif model.cfg.tied and len(tied_ranks) > 1:
            for j in range(n):
                g = dist.new_group([r * n + j for r in tied_ranks])
                if self.pp_rank in tied_ranks and j == self.local_index:
                    self.tied_group = g

        self.segments = [Segment(model, *segment_blocks(stages[k].layers, model.cfg.layers),
                                 recompute=stages[k].recompute,
                                 recompute_blocks=recomputed_blocks(stages[k], model.cfg.layers))
                         for k in self.stage_ids]
        self.first, self.last = self.segments[0].first, self.segments[-1].last
        if self.pp > 1:
            _release_others(model, self.segments)
        self.autocast_dtype = autocast_dtype
        # activations between stages: fp32 under autocast (the residual stream stays in the
        # parameters' dtype), the compute dtype when FSDP casts the parameters
        self.boundary_dtype = torch.float32
        self.ddp = False
        self.modules: list[nn.Module] = []
        for seg_stage, seg in zip(self.stage_ids, self.segments):
            seg.to(self.device)
            if self.cp_mesh is not None:
                if seg.family == "llama":
                    for block in seg.blocks.values():
                        cast(Any, block.attn).repeat_kv = True      # ring attention takes equal head counts
                elif seg.first:
                    seg.cp_positions = torch.arange(plan.model.seq, device=self.device)
            if self.tp_mesh is not None:
                # each chunk's own layout (under interleaving a rank's chunks differ in their
                # embeddings and head); a last stage's copy of a tied embedding is stored as
                # the first stage stores it
                own = layouts[seg_stage]
                copy = seg.last and not seg.first
                apply_tp(seg, self.tp_mesh, own.split_embeddings + (layouts[0].split_embeddings if copy else ()),
                         own.split_head, own.sequence_dim, own.rs_embeddings,
                         own.hidden_split_embeddings + (layouts[0].hidden_split_embeddings if copy else ()),
                         own.rows_head_dim)
            # after apply_tp, which gives GPT's attention its tensor-parallel forward (the
            # checkpoint wraps the forward that runs), before FSDP2 wraps the blocks
            recompute_and_compile(seg, compile, self.tp_mesh is not None)
            ignored: set[nn.Parameter] = set()
            if seg.last and layouts[seg_stage].dp_vocab_head:
                seg.dp_head = self.dp_mesh
                if not seg.tied:
                    # the head's vocab shard, summed by no one (its gradient is whole here)
                    from torch.distributed.tensor import Shard, distribute_tensor
                    head: Any = cast(Any, seg).head
                    head.weight = nn.Parameter(distribute_tensor(head.weight.data, self.dp_mesh, [Shard(0)]))
                    ignored.add(head.weight)
            module: nn.Module = seg
            if self.replica_mesh is not None and self.zero:
                apply_fsdp(seg, list(seg.blocks.values()), self.replica_mesh, self.zero, autocast_dtype, ignored,
                           tuple(seg.get_submodule(p) for p in layouts[seg_stage].sharded_modules))
                self.boundary_dtype = autocast_dtype or torch.float32
            elif self.replica_mesh is not None and self.tp_mesh is None and not self.mixed:
                # (a mixed pipeline's own schedule all-reduces the gradients after the backward)
                from torch.nn.parallel import DistributedDataParallel
                if ignored:
                    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                        seg, [n for n, p in seg.named_parameters() if p in ignored])
                # under cp each rank's rope tables / positions are its own shard: not broadcast
                module = DistributedDataParallel(
                    seg, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    process_group=self.replica_mesh.get_group(), gradient_as_bucket_view=True,
                    broadcast_buffers=self.cp_mesh is None)
                self.ddp = True
            self.modules.append(module)
        if self.zero:
            self.autocast_dtype = None         # FSDP's policy casts the parameters instead
        self.segment = self.segments[0]
        self.module: Any = self.modules[0]
        self.names = {n: p for seg in self.segments for n, p in seg.named_parameters()}
        # dp x tp without ZeRO: DDP takes no DTensor parameters, so gradients are all-reduced
        # over dp in flat buckets after the backward.
        self.manual_dp = self.dp_mesh is not None and not self.zero and not self.ddp
        params: list[torch.Tensor] = list(self.names.values())
        self.optimizer: Any = (ShardOptimizer(params, optimizer, lr, self.device) if not self.zero
                               else make_optimizer(params, optimizer, lr, self.device))
        # the buffers torch's context_parallel shards beside the tokens (the same tensors every step)
        self.cp_tables = self._position_tables() if self.cp_mesh is not None else []
        self.schedule: Any = None
        if self.mixed:
            # stages of different sizes or layouts: each holds its dp rows of the boundary tensor
            self.schedule = P2PPipeline(
                self.stage_index, layouts, [(x.logical_mesh[0], x.logical_mesh[1]) for x in stages], self.stage_offsets, self.rank,
                self.dp_rank, self.n_microbatches, plan.training.schedule,
                (self.microbatch_size, plan.model.seq, self.cfg.hidden), self.boundary_dtype, self.device)
        elif self.n_stages > 1:
            self.schedule = self._pipeline(plan.training.schedule)

    def _pipeline(self, name: str):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
        assert self.mesh is not None
        seq = self.plan.model.seq
        act = [self.local_mb, seq, self.cfg.hidden]
        if self.layout.sequence_dim is not None:
            # sequence parallelism: this tp rank's chunk of the residual stream crosses stages
            act[self.layout.sequence_dim] //= self.layout.tp
        pipe: list[Any] = []
        for k, seg, module in zip(self.stage_ids, self.segments, self.modules):
            x = (torch.zeros(self.local_mb, seq, dtype=torch.long, device=self.device) if seg.first else
                 torch.empty(act, dtype=self.boundary_dtype, device=self.device, requires_grad=True))
            # requires_grad marks the boundary tensors whose gradients travel back
            y = (torch.empty(1, device=self.device) if seg.last else
                 torch.empty(act, dtype=self.boundary_dtype, device=self.device, requires_grad=True))
            pipe.append(PipelineStage(module, k, self.n_stages, self.device, input_args=(x,), output_args=(y,),
                                      group=self.mesh["pp"].get_group()))
        if name == "interleaved":
            return ScheduleInterleaved1F1B(pipe, n_microbatches=self.n_microbatches, loss_fn=_loss_is_output,
                                           scale_grads=True)
        # torch's 1F1B refuses fewer microbatches than stages; with so few, 1F1B's order is GPipe's
        cls = ScheduleGPipe if name == "gpipe" or self.n_microbatches < self.n_stages else Schedule1F1B
        return cls(pipe[0], n_microbatches=self.n_microbatches, loss_fn=_loss_is_output, scale_grads=True)

    # -- training -------------------------------------------------------------------------------
    def _local_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This dp rank's rows of every microbatch, microbatch-major."""
        B, mb, dp = self.n_microbatches, self.microbatch_size, self.layout.dp
        if dp == 1:
            return t
        return t.reshape(B, dp, mb // dp, *t.shape[1:])[:, self.dp_rank].reshape(B * (mb // dp), *t.shape[1:])

    def _contexts(self):
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        if self.last and (self.tp_mesh is not None and self.last_layout.split_head or self.last_layout.dp_vocab_head):
            from torch.distributed.tensor.parallel import loss_parallel
            stack.enter_context(loss_parallel())
        return stack

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        B, mb = self.n_microbatches, self.microbatch_size
        for t in batch.values():
            if t.shape[0] != B * mb:
                raise ValueError(f"batch of {t.shape[0]} rows; the plan's global batch is {B} x {mb}")
        ids = self._local_rows(batch["ids"]).to(self.device, non_blocking=True)
        targets = self._local_rows(batch["targets"]).to(self.device, non_blocking=True)
        lmb = self.local_mb
        loss = None
        with self._contexts():
            if self.schedule is None:
                total = torch.zeros(1, device=self.device)
                for i in range(B):
                    sync = i == B - 1
                    ctx = self.module.no_sync() if self.ddp and not sync else contextlib.nullcontext()
                    if self.zero:
                        self._fsdp_accumulation(last=sync)
                    x, y = ids[i * lmb:(i + 1) * lmb], targets[i * lmb:(i + 1) * lmb]
                    cp: Any = contextlib.nullcontext()
                    if self.cp_mesh is not None:
                        # torch's context_parallel shards the tokens (and the position tables)
                        # in place, in the load-balanced order, around forward and backward;
                        # the attention kernels run the ring inside
                        x, y = x.clone(), y.clone()
                        cp = _context_parallel(self.cp_mesh, [x, y], self.cp_tables)
                    with ctx, cp:
                        out = self.module(x, y)
                        (out / B).backward()
                    total += out.detach().float()
                loss = (total / B).reshape(())
            elif self.mixed:
                module = self.modules[0]

                def run(x: torch.Tensor | None, i: int, k: int) -> torch.Tensor:
                    if self.first:
                        return module(ids[i * lmb:(i + 1) * lmb])
                    if self.last:
                        return module(x, targets[i * lmb:(i + 1) * lmb])
                    return module(x)
                # under ZeRO, FSDP2's gradient sync and resharding follow the last microbatch
                mb_losses = self.schedule.step(run, (lambda last: self._fsdp_accumulation(last=last))
                                               if self.zero else None)
                if self.last:
                    loss = torch.stack([x.detach().float().reshape(()) for x in mb_losses]).mean()
            else:
                losses: list[torch.Tensor] = []
                if self.first:
                    self.schedule.step(ids, **({"target": targets, "losses": losses, "targets": targets}
                                               if self.last else {}))
                elif self.last:
                    self.schedule.step(target=targets, losses=losses, targets=targets)
                else:
                    self.schedule.step()
                if self.last:
                    loss = torch.stack([x.detach().float().reshape(()) for x in losses]).mean()
        self._reduce_grads()
        if loss is not None and self.replica_mesh is not None:
            # each dp (x cp) rank's loss is the mean over its rows (tokens); the plan's loss is their mean
            dist.all_reduce(loss, group=self.replica_mesh.get_group())
            loss = loss / self.replica_mesh.size()
        return loss

    def _fsdp_accumulation(self, last: bool) -> None:
        """How FSDP2 treats a microbatch's backward under gradient accumulation, by ZeRO stage.
        FSDP2 reduce-scatters every backward unless told not to (set_requires_gradient_sync,
        "gradient accumulation without communication", at the cost of unsharded gradients) and
        reshards after every backward unless told not to (set_reshard_after_backward: the next
        forward then needs no all-gather, at the cost of unsharded weights).
        ZeRO-1 shards the optimizer state only: full gradients accumulate locally (fp32 under
        MixedPrecisionPolicy's reduce_dtype) and are reduce-scattered once, after the last
        microbatch, like DDP's no_sync. ZeRO-2 shards the gradients: a reduce-scatter per
        microbatch into the sharded fp32 gradient (DeepSpeed's stage 2 does the same). ZeRO-1
        and ZeRO-2 keep the weights unsharded (reshard_after_forward=False, apply_fsdp), so
        they stay gathered from the first forward to the last backward: one all-gather per
        step. ZeRO-3 regathers per microbatch, as its memory requires. Pipelines need none of
        this: torch.distributed.pipelining turns sync and resharding off for every microbatch
        and reduce-scatters once after the schedule (PipelineStage.perform_reduce_grad)."""
        if self.zero >= 3:
            return
        for m in self.modules:
            fsdp: Any = m
            fsdp.set_requires_gradient_sync(last or self.zero >= 2)
            fsdp.set_reshard_after_backward(last)

    def _position_tables(self) -> list[tuple[torch.Tensor, int]]:
        """The buffers indexed by token position, with their sequence dims: Llama's rope tables
        in every block, GPT's positions."""
        out: list[tuple[torch.Tensor, int]] = []
        for seg in self.segments:
            pos: Any = seg.cp_positions
            if pos is not None:
                out.append((pos, 0))
            if seg.family == "llama":
                for block in seg.blocks.values():
                    attn: Any = block.attn
                    out += [(attn.cos, 0), (attn.sin, 0)]
        return out

    def _reduce_grads(self) -> None:
        if self.tp_mesh is not None:
            # an embedding's gradient can come back replicated or partial over tp: store it as
            # its weight is stored, so shards pair up in the reductions and the optimizer
            for p in self.names.values():
                d: Any = p
                if is_dtensor(d) and d.grad is not None and tuple(d.grad.placements) != tuple(d.placements):
                    d.grad = d.grad.redistribute(d.device_mesh, d.placements)
        if self.manual_dp:
            assert self.dp_mesh is not None
            _all_reduce_mean([p.grad for p in self.names.values() if p.grad is not None], self.dp_mesh.get_group())
        if self.tied_group is not None:
            w = self.names[f"{self.segment.embed_names[0]}.weight"]
            if self.mixed:
                sum_tied_grad(w, self.tied_group, self.stage_sizes[self.stage_index])
            elif w.grad is not None:
                dist.all_reduce(_local(w.grad), group=self.tied_group)

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        loss = self.forward_backward(batch)
        self.optimizer_step()
        return loss

    # -- inspection (collective over the stage's mesh) ------------------------------------------
    def full_grads(self) -> dict[str, torch.Tensor]:
        return {n: _full(p.grad) for n, p in self.names.items() if p.grad is not None}

    def full_params(self) -> dict[str, torch.Tensor]:
        return {n: _full(p.detach()) for n, p in self.names.items()}

    def param_specs(self) -> dict[str, str]:
        """How each parameter is stored, as a plan spec over the stage's logical mesh."""
        from torch.distributed.tensor import Replicate
        out = {}
        for n, p in self.names.items():
            d: Any = p
            if not is_dtensor(d):
                out[n] = "R" * d.dim()
                continue
            names = d.device_mesh.mesh_dim_names
            by_axis = [next((pl for nm, pl in zip(names, d.placements) if nm == axis), None)
                       for axis in self.layout.mesh_dims]
            out[n] = spec_of(tuple(pl or Replicate() for pl in by_axis), d.dim())
        return out

    @property
    def shard_local_ops(self) -> list[str]:
        return []


class ShardOptimizer:
    """The optimizer over each parameter's local shard (a plain tensor sharing the DTensor's
    storage; plain parameters as they are). Adam and SGD update element by element, so stepping
    the shards steps the DTensors without a DTensor dispatch per op.
    Gradients must be stored as their parameters are (EngineModel._reduce_grads sees to it).
    Not for FSDP2's parameters, whose shards FSDP re-points at its first forward."""

    def __init__(self, params: list[torch.Tensor], kind: str, lr: float, device: torch.device) -> None:
        with torch.no_grad():
            self.pairs = [(p, _local(p)) for p in params]
        self.inner = make_optimizer([a for _, a in self.pairs], kind, lr, device)

    def step(self) -> None:
        with torch.no_grad():
            for p, a in self.pairs:
                if a is not p:
                    a.grad = None if p.grad is None else _local(p.grad)
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for p, _ in self.pairs:
            p.grad = None


def _checkpoint_forward(module: nn.Module, backend: str | None = None) -> None:
    """The module's activations are recomputed in the backward: its forward (not its hooks, which
    stay outside, as under torch's checkpoint_wrapper) runs under non-reentrant checkpointing,
    compiled inside the checkpoint with `backend`. In place, so parameter names stay. Selective
    recomputation checkpoints each block's attention module (Megatron recomputes the attention
    core; this also reruns q/k/v), full recomputation whole blocks (recompute_and_compile)."""
    inner = module.forward
    if backend is not None:
        inner = torch.compile(inner, backend=backend)

    def forward(x):
        if not torch.is_grad_enabled():
            return inner(x)
        return torch.utils.checkpoint.checkpoint(inner, x, use_reentrant=False)
    module.forward = forward


def _release_others(model: nn.Module, segments: list[Segment]) -> None:
    """Free the weights of the model's parts that other pipeline ranks run (the model is the
    caller's full copy; this rank keeps only its stages)."""
    mine = {id(p) for seg in segments for p in seg.parameters()}
    for p in model.parameters():
        if id(p) not in mine:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def _set_rotate_method(exchange: str) -> None:
    """torch's ring attention rotates K/V shards with all-to-all point-to-point steps ("ring");
    "allgather" gathers them at once."""
    try:
        from torch.distributed.tensor.experimental._attention import set_rotate_method
    except ImportError as e:
        raise EngineMismatch(f"this torch ({torch.__version__}) has no context-parallel rotate method: {e}") from None
    set_rotate_method("alltoall" if exchange == "ring" else "allgather")


@contextlib.contextmanager
def _context_parallel(mesh, data: list[torch.Tensor], tables: list[tuple[torch.Tensor, int]]):
    """torch.distributed.tensor.experimental.context_parallel over `mesh`: the token rows in
    `data` (sequence dim 1) are sharded for good, the tables restored afterwards."""
    from torch.distributed.tensor.experimental import context_parallel
    with context_parallel(mesh, buffers=data + [t for t, _ in tables],
                          buffer_seq_dims=[1] * len(data) + [d for _, d in tables],
                          no_restore_buffers=set(data)):
        yield


def _all_reduce_mean(grads: list[torch.Tensor], group) -> None:
    """All-reduce the local shards of `grads` over `group` and average, in flat buckets per dtype."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    n = dist.get_world_size(group)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(_local(g))
    for ts in by_dtype.values():
        flat = _flatten_dense_tensors(ts)
        dist.all_reduce(flat, group=group)
        flat.div_(n)
        for t, v in zip(ts, _unflatten_dense_tensors(flat, ts)):
            t.copy_(v)


def _local(t: Any) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _loss_is_output(output, target):
    return output.sum()


def _full(t: Any) -> torch.Tensor:
    return (t.full_tensor() if is_dtensor(t) else t).detach().float().cpu()


# ---------------------------------------------------------------------------------------------

def lower(plan: Plan, model: Any, example_inputs: tuple, device: str | torch.device, optimizer: str = "adam",
          lr: float = 1e-3, autocast_dtype: torch.dtype | None = None, compile: bool | None = None) -> EngineModel:
    """The plan on PyTorch's engines; EngineMismatch when its layout matches none."""
    if not hasattr(model, "cfg") or getattr(model.cfg, "family", None) not in FAMILY_MODULES:
        raise EngineMismatch(f"model {type(model).__name__} is not a zoo model the engines know")
    _, ir = trace_model(model, example_inputs, plan.training.dtype)
    check_plan_matches(plan, ir)
    _check_specs(plan)
    layouts = match_plan(plan, ir, model.cfg.family)
    cp = max(x.cp for x in layouts)
    if cp > 1 and torch.device(device).type != "cuda":
        raise EngineMismatch("context parallelism runs on torch's context_parallel, which swaps the CUDA attention "
                             "kernels only; on CPU the exact all-gather program runs it (runtime.context)")
    if cp > 1 and autocast_dtype is None and (plan.model.seq // (2 * cp)) % 32:
        # fp32 attention runs on the memory-efficient kernel, whose log-sum-exp comes padded to
        # 32 rows: torch 2.11's ring merge then fails on shorter chunks
        raise EngineMismatch(f"fp32 context parallelism needs load-balanced chunks of a multiple of 32 tokens; "
                             f"{plan.model.seq} tokens over 2 x {cp} chunks are not")
    return EngineModel(plan, model, layouts, torch.device(device), optimizer, lr, autocast_dtype, compile)


def apply(plan: Plan, model: nn.Module | None = None, *, example_inputs: tuple | None = None,
          device: str | torch.device = "cpu", optimizer: str = "adam", lr: float = 1e-3, seed: int = 0,
          autocast_dtype: torch.dtype | None = None, engines: bool = True,
          compile: bool | None = None) -> EngineModel | ParallelModel:
    """Apply `plan` on this rank (see runtime.apply.apply): on PyTorch's engines where its layout
    matches one, else the fx/DTensor program, with a warning naming what did not match.
    compile (torch.compile per transformer block) defaults to default_compile."""
    if model is None:
        model = build_model(plan, device="cpu", seed=seed)
    if example_inputs is None:
        example_inputs = zoo_inputs(plan)
    if engines:
        try:
            return lower(plan, model, example_inputs, device, optimizer, lr, autocast_dtype, compile)
        except EngineMismatch as e:
            warnings.warn(f"autopar.runtime: plan {plan.config.label or plan.strategy!r} runs op by op on "
                          f"DTensors (slow): {e}", stacklevel=2)
    return apply_program(plan, model, example_inputs=example_inputs, device=device, optimizer=optimizer, lr=lr,
                         seed=seed, autocast_dtype=autocast_dtype, compile=compile)
