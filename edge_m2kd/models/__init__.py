from edge_m2kd.models.incremental import DeployedClassifier, GrowingLinear, IncrementalNet, NetOutput
from edge_m2kd.models.resnet import BACKBONES, build_backbone

__all__ = ["BACKBONES", "DeployedClassifier", "GrowingLinear", "IncrementalNet", "NetOutput", "build_backbone"]
