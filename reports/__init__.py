"""Reports on built datasets and runs: statistics (stats/), checks (verify/), drawn samples (show/), the quickstart's
run report (quickstart.py). They read shards and runs through shards/ and storage/ and write HTML, PNG and JSON;
the `xvlm stats / verify / show` commands (tools/) are their face."""
