"""Reports: run summaries, plots and (later) the viewer bundle."""
