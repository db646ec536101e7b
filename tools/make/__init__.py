"""From a model id to a compiled directory: sources, streamed weights, artefacts, dumps,
calibration and predictor training."""
