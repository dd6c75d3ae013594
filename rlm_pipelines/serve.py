"""`python -m rlm_pipelines.serve schedule=nightly`: the command's stable name; the scheduler itself is
`rlm_pipelines.orchestration.serve` (the orchestration folder is the one that imports Prefect)."""

from rlm_pipelines.orchestration.serve import main

if __name__ == "__main__":
    main()
