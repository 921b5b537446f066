from edge_m2kd.models.backbones import BACKBONES, build_backbone
from edge_m2kd.models.incremental import DeployedClassifier, GrowingLinear, IncrementalNet, NetOutput

__all__ = ["BACKBONES", "DeployedClassifier", "GrowingLinear", "IncrementalNet", "NetOutput", "build_backbone"]
