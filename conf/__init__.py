"""The built-in Hydra config groups, one folder per swappable part. Installed as `rlm_pipelines.conf`
(found with `rlm_pipelines.paths.conf_dir()`); users add their own groups with `--config-dir`."""
