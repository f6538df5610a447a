"""The online front door: a Ray Serve application around the same engine call as the batch job.

`app.py` holds the deployments (FastAPI ingress + GPU `Protector`), `requests.py` turns a request
into validated photos and an effective config, `jobs.py` keeps submitted jobs for polling,
`schemas.py` the HTTP models, `command.py` the `capray serve` CLI.
"""
