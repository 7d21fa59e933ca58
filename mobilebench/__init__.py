"""mobilebench: train, evaluate, compare and deploy the MobileNet family."""

__version__ = "0.1.0"
