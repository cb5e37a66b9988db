"""Measuring: ASR and utility over training, intervals, judge validation, the safety-utility frontier, risk
comparison, the user task."""
