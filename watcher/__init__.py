"""cni-watcher: CNI networking for containerd containers that opt in with a label."""

__version__ = "0.1.0"
