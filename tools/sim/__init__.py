"""Simulators: routing traces replayed through the runtime's cache model with a clock, every
predictor and policy, request schedules."""
