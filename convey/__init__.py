"""convey: a Layer 4 TCP load balancer for Linux."""

__version__ = "0.1.0"
