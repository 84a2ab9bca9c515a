"""Reduce's stages, each a pure function of the engine's context and typed results: the
baseline, the resilience analysis and map, calibration, retraining with top-ups, grouping
(eFAT), the predictor study, the policies compared, and the cost accounting."""
