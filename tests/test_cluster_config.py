"""The production configs are consistent: cluster.yaml is a valid Ray cluster launcher config
whose node types offer every custom resource deployments/production.yaml requests, its only
account-specific values are documented placeholders, and scripts/fetch-keys.sh lays key material
out where the Serve config looks for it (signing key on journal nodes only, secrets 0600)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import yaml

from serve_journal.examples.cluster_demo import render

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDERS = {"AWS_REGION", "SUBNET_ID", "SECURITY_GROUP_ID", "NODE_INSTANCE_PROFILE",
                "JOURNAL_BUCKET", "WITNESS_BUCKET", "SECRETS_PREFIX"}


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_is_a_valid_launcher_config_with_documented_placeholders():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_cluster()))
    text = (ROOT / "cluster.yaml").read_text()
    used = set(re.findall(r"<([A-Z_]+)>", text))
    assert used == PLACEHOLDERS
    header = text.split("cluster_name:")[0]
    assert all(f"<{name}>" in header for name in used), "every placeholder is documented on top"
    assert "SERVE_JOURNAL_KEK=" not in text.replace("SERVE_JOURNAL_KEK=%s", "")


def test_every_requested_resource_exists_on_a_node_type():
    offered: set[str] = set()
    for node_type in _cluster()["available_node_types"].values():
        offered |= set(node_type["resources"])
    config = yaml.safe_load(render((ROOT / "deployments" / "production.yaml").read_text(),
                                   _values()))
    requested = set()
    for app in config["applications"]:
        for deployment in app.get("deployments", []):
            requested |= set(deployment.get("ray_actor_options", {}).get("resources", {}))
    assert requested == {"serving", "journal"}
    assert requested <= offered


def _values() -> dict[str, str]:
    return {"PROXY_LOCATION": "EveryNode", "HTTP_PORT": "8000", "JOURNAL_URI": "s3://j/prod",
            "WITNESS_URI": "s3://w/prod", "KAFKA_BOOTSTRAP": "b:9092",
            "MLFLOW_TRACKING_URI": "http://mlflow", "KEYS_DIR": "/etc/serve-journal/keys",
            "SPOOL_DIR": "/var/lib/serve-journal/spool", "KAFKA_IDEMPOTENCE": "true"}


def test_fetch_keys_puts_each_role_s_keys_where_the_serve_config_reads_them(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name, value in {"kek": "ab" * 32, "vault-url": "postgresql://u:p@db/v",
                        "keyring": "{}", "counters-key": "COUNTERS", "signing-key": "SIGNING"}.items():
        (secrets / name).write_text(value)
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\ncat "{secrets}/$(basename "$1")"\n')
    hook.chmod(0o700)
    config = yaml.safe_load(render((ROOT / "deployments" / "production.yaml").read_text(),
                                   {**_values(), "KEYS_DIR": str(tmp_path / "serving" / "keys")}))
    for role in ("serving", "journal"):
        keys = tmp_path / role / "keys"
        env = {**os.environ, "SERVE_JOURNAL_ROLE": role, "SERVE_JOURNAL_SECRETS_PREFIX": "p",
               "SERVE_JOURNAL_SECRETS_HOOK": str(hook), "SERVE_JOURNAL_KEYS_DIR": str(keys)}
        subprocess.run(["bash", str(ROOT / "scripts" / "fetch-keys.sh")], env=env, check=True,
                       capture_output=True)
        assert (keys / "signing" / "manifest-signing.pem").exists() == (role == "journal")
        env_file = keys.parent / "env"
        assert "SERVE_JOURNAL_KEK=" + "ab" * 32 in env_file.read_text()
        for path in [env_file, *keys.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
    fraud = next(a for a in config["applications"] if a["name"] == "fraud")["args"]["journal"]
    assert Path(fraud["counters_key_file"]).exists()
    assert (Path(fraud["privacy_dir"]) / "keys" / "keyring.json").exists()
