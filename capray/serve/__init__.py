"""The online front door: a Ray Serve application around the same engine call as the batch job.

`app.py` holds the deployments (stateless FastAPI `Ingress` + GPU `Protector`) and the routes;
`auth.py` API keys; `limits.py` what is refused before work (bytes, pixels, costly overrides);
`requests.py` JSON/multipart bodies → photo files; `store.py` the durable job store (fsspec);
`runner.py` runs, resumes and expires jobs; `results.py` PNGs and the zip; `errors.py` what a
client is told; `schemas.py` the HTTP models; `command.py` the `capray serve` CLI.
"""
