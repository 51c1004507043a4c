"""fedlsc-flwr: FedLSC layer-similarity federated learning as a Flower strategy."""

from fedlsc_flwr.strategy import FedLSC, PersonalizedFedAvg, build_strategy

__all__ = ["FedLSC", "PersonalizedFedAvg", "build_strategy"]
