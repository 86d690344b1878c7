"""Serve the deployments of `prefect.yaml` from this process: `python deployments/serve.py`."""

from audiobooks_scoring.deployments.serve import serve_deployments

if __name__ == "__main__":
    serve_deployments()
