"""The targets of `vlhub convert --to`, one folder each (the checkpoint formats share vlhub/targets/checkpoint/):
its options and how they settle against a model, its builder and exporters, its part of `vlhub plan` and `vlhub
check`, and its smoke runner. `registry.py` lists them; `base.py` says what a target is."""
