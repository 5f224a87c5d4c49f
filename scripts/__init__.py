"""Operational scripts: the prepared GPU check (gpu_prepare -> gpu_check), run in one GPU lease."""
