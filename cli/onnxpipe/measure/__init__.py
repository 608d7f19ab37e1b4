"""Measuring an export: its quality on labelled data (`eval`: quality.py, metrics.py) and its speed on
this machine (`bench`: speed.py). Both run the same tasks as the commands, through ONNX Runtime, and
never print.
"""
