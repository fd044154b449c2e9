"""Stage 1: the degradation estimator (blur and noise scores of an LR image, each in [0, 1])."""

from degsr.estimator.config import EstimatorNetConfig, tiny_net
from degsr.estimator.export import load_estimator, save_estimator
from degsr.estimator.network import SCORES, DegradationEstimator

__all__ = ["SCORES", "DegradationEstimator", "EstimatorNetConfig", "load_estimator",
           "save_estimator", "tiny_net"]
