"""The jobs around training, each one of jobs/submit.py: sample, evaluate and watch, export, plan
(memory planner) and preflight."""
