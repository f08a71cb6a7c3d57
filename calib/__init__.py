"""Calibration: text sources, sequential block-by-block activation capture, Hessian statistics.

Installed as ``quantlab.calib`` (setup.py maps the top-level ``calib/`` folder onto it).
"""
