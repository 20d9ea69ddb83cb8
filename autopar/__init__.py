"""autopar: an automatic parallelization planner for training transformers.

    import autopar
    p = autopar.plan("gpt-39b", "p3.16xlarge")        # searched plan, evaluated
    p.to_json("plan.json"); autopar.Plan.from_json("plan.json")
    autopar.compare("gpt-39b", "p3.16xlarge")         # auto vs dp / zero / tp / pp / 3d
"""

from autopar.compare import compare
from autopar.evaluation.evaluator import evaluate
from autopar.hardware.presets import PRESETS, load_cluster
from autopar.hardware.specs import Cluster, ClusterError
from autopar.search.planner import plan

from .plan import ClusterInfo, ModelInfo, Plan, PlanConfig, PlanError, Prediction, StageMemory, StagePlan, Training

__all__ = ["plan", "compare", "evaluate", "Plan", "StagePlan", "PlanError", "ModelInfo", "ClusterInfo", "Training",
           "Prediction", "PlanConfig", "StageMemory", "Cluster", "ClusterError", "load_cluster", "PRESETS"]
