"""The images a job attacks: MNIST (fetched offline, checksummed) and ImageNet photos."""

from pipeline.data.mnist import MNISTData
from pipeline.data.photos import PhotoData

__all__ = ["MNISTData", "PhotoData"]
