"""`python -m jobs <command> ...`: the `anomaly` command line, for `ray job submit -- python -m jobs score ...`
and anywhere the installed script is not on PATH."""

from jobs.cli import main

main(prog_name="python -m jobs")
