"""Plan a GPT on a cluster from Python, inspect the plan, save it, and compare with 3D.

    python examples/plan_gpt.py [--model gpt-6.7b] [--cluster p3.16xlarge] [--nodes 2]
"""

import argparse

import autopar
from autopar.evaluation.baselines import Config3D, build_3d
from autopar.model import ModelSource
from autopar.report import plan_summary

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="gpt-6.7b")
ap.add_argument("--cluster", default="p3.16xlarge")
ap.add_argument("--nodes", type=int, default=2)
ap.add_argument("--global-batch", type=int, default=256)
a = ap.parse_args()

cluster = autopar.load_cluster(a.cluster, a.nodes)
model = ModelSource(a.model)                     # traced once per microbatch size, then cached

plan = autopar.plan(model, cluster, global_batch=a.global_batch)
print(plan_summary(plan))
for stage in plan.stages[:1]:                    # what the ILP chose for the first stage's matmuls
    for op in stage.ops:
        if op["kind"] in ("matmul", "attention"):
            print(f"  {op['name']:<32} {op['strategy']:<14} out {op['out_spec']}")
plan.to_json("plan.json")                        # validated against the shipped JSON Schema

# A hand-made Megatron plan on the same cluster, scored by the same evaluator.
tp = min(8, cluster.gpus_per_node)
ref = build_3d(model, cluster, a.global_batch, Config3D(dp=cluster.n_gpus // tp, tp=tp, pp=1, microbatch=1))
print(f"\nauto {plan.predicted.step_time_s:.2f} s/step vs Megatron {ref.config.label}: "
      f"{ref.predicted.step_time_s:.2f} s/step" + ("" if ref.predicted.fits else " (does not fit)"))
