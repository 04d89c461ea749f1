"""Fleet simulator: scale and ground truth for the pipeline (see fleet.py for the model)."""

from collectors.simulate.fleet import FleetSimulator, Frame
from collectors.simulate.scenario import Scenario, ScenarioError, load_scenario

__all__ = ["FleetSimulator", "Frame", "Scenario", "ScenarioError", "load_scenario"]
