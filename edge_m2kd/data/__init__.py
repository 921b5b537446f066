"""Data: sources that all return an `ImageSet`, the class-incremental stream, and batched
tensor augmentation."""

from edge_m2kd.data.augment import normalize, random_crop_flip, to_float
from edge_m2kd.data.sources import (
    IMAGE_EXTENSIONS,
    ImageSet,
    load_cifar100,
    load_digits,
    load_image_folder,
    load_npz,
)
from edge_m2kd.data.stream import class_order, per_class_limit, split_into_steps, train_val_split

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "class_order",
    "load_cifar100",
    "load_digits",
    "load_image_folder",
    "load_npz",
    "normalize",
    "per_class_limit",
    "random_crop_flip",
    "split_into_steps",
    "to_float",
    "train_val_split",
]
