"""`python -m sasft_ray.secret_store --cloud aws|gcp NAME`: print one secret from the cloud's secret store.

The cluster files start Ray with it (the Ray cluster token, HF_TOKEN), so no secret is written in a
file, in a node's metadata, or in a job's `runtime_env` (which Ray's job API returns in clear). The
node reaches the store with its own identity: the instance profile on AWS (Secrets Manager), the
service account through the metadata server on GCP (Secret Manager's REST API).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys


def aws(name: str) -> str:
    import boto3

    return boto3.client("secretsmanager").get_secret_value(SecretId=name)["SecretString"]


def gcp(name: str) -> str:
    import requests

    metadata = f"http://{os.environ.get('GCE_METADATA_HOST', 'metadata.google.internal')}/computeMetadata/v1"
    headers = {"Metadata-Flavor": "Google"}
    project = requests.get(f"{metadata}/project/project-id", headers=headers, timeout=10).text
    token = requests.get(f"{metadata}/instance/service-accounts/default/token", headers=headers,
                         timeout=10).json()["access_token"]
    reply = requests.get(f"https://secretmanager.googleapis.com/v1/projects/{project}/secrets/{name}/versions/"
                         "latest:access", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    reply.raise_for_status()
    return base64.b64decode(reply.json()["payload"]["data"]).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cloud", choices=("aws", "gcp"), required=True)
    parser.add_argument("name", help="the secret's name in the store")
    args = parser.parse_args(argv)
    try:
        value = {"aws": aws, "gcp": gcp}[args.cloud](args.name)
    except Exception as e:  # a node that cannot read its secret must not start half-configured
        print(f"secret {args.name!r} from the {args.cloud} secret store: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
