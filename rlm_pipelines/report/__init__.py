"""Reports over many runs: the sweep report a multirun ends with."""
