"""The fraud example, as a user would write it.

The deployment class, training and registration live in ``serve_journal.examples.fraud`` so
Ray workers can import them on every node; this file shows the user-facing part: one decorator,
and ``FraudModel`` loading its model with ``serve_journal.load_model`` (so each entry names the
version, run and artifact that scored it).

    python examples/fraud.py            # after `bash scripts/demo.sh` created ./demo-output
"""

from __future__ import annotations

import sys

from ray import serve

from serve_journal import flush_journal, journaled
from serve_journal.examples.fraud import FraudModel

TRACKING_URI = "sqlite:///demo-output/mlflow.db"

FraudDeployment = journaled(
    model="models:/fraud@champion",  # entries name the version FraudModel loaded with load_model
    threshold=0.75,
    tracking_uri=TRACKING_URI,
    journal_uri="./demo-output/journal",
)(serve.deployment(FraudModel, name="FraudModel"))

app = FraudDeployment.bind(tracking_uri=TRACKING_URI)

if __name__ == "__main__":
    handle = serve.run(app, name="fraud-example", route_prefix="/fraud-example")
    import requests

    answer = requests.post("http://127.0.0.1:8000/fraud-example", json={
        "subject_id": "user-0001",
        "features": {"amount": 420.0, "hour": 3, "merchant_risk": 0.7, "distance_km": 80.0,
                     "card_age_days": 12, "foreign": 1},
    }, headers={"x-caller-id": "example"}, timeout=60).json()
    print(answer)
    sys.exit(0 if flush_journal("./demo-output/journal") else 1)
