"""autopar: an automatic parallelization planner for training transformers.

    import autopar
    p = autopar.plan("gpt-39b", "p3.16xlarge")        # searched plan, evaluated
    p.to_json("plan.json"); autopar.Plan.from_json("plan.json")
    autopar.compare("gpt-39b", "p3.16xlarge")         # auto vs dp / zero / tp / pp / 3d
"""

from .cluster import PRESETS, Cluster, ClusterError, load_cluster
from .plan import Plan, PlanError, StagePlan
from .evaluator import evaluate
from .planner import plan
from .compare import compare

__all__ = ["plan", "compare", "evaluate", "Plan", "StagePlan", "PlanError", "Cluster", "ClusterError",
           "load_cluster", "PRESETS"]
