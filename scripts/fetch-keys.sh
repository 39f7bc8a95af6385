#!/usr/bin/env bash
# Fetch one node's key material from a secrets manager at node setup (cluster.yaml runs it).
# Nothing is baked into the image: files are 0600 in 0700 folders owned by the user Ray runs as.
#
#   SERVE_JOURNAL_ROLE            head | serving | journal  (journal nodes get the signing key)
#   SERVE_JOURNAL_SECRETS_PREFIX  e.g. serve-journal/prod (AWS Secrets Manager secret names)
#   SERVE_JOURNAL_SECRETS_HOOK    optional: a command printing one secret's value given its name
#                                 (HashiCorp Vault, GCP Secret Manager, ...); default: aws CLI
#   SERVE_JOURNAL_KEYS_DIR        default /etc/serve-journal/keys
#
# Secrets it reads (create them once from `serve-journal init-keys` output):
#   <prefix>/kek           the KEK, 64 hex digits      -> environment only (/etc/serve-journal/env)
#   <prefix>/vault-url     postgresql://user:pass@...  -> environment only
#   <prefix>/keyring       privacy/keys/keyring.json (wrapped under the KEK)
#   <prefix>/counters-key  privacy/keys/counters-signing.pem (every node: replicas sign counters)
#   <prefix>/signing-key   signing/manifest-signing.pem (journal nodes and the head only)
set -euo pipefail
role="${SERVE_JOURNAL_ROLE:?set SERVE_JOURNAL_ROLE to head, serving or journal}"
prefix="${SERVE_JOURNAL_SECRETS_PREFIX:?set SERVE_JOURNAL_SECRETS_PREFIX}"
keys="${SERVE_JOURNAL_KEYS_DIR:-/etc/serve-journal/keys}"
etc="$(dirname "$keys")"

secret() {
  if [ -n "${SERVE_JOURNAL_SECRETS_HOOK:-}" ]; then
    $SERVE_JOURNAL_SECRETS_HOOK "$prefix/$1"
  else
    aws secretsmanager get-secret-value --secret-id "$prefix/$1" --query SecretString --output text
  fi
}

umask 077
sudo_if() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
sudo_if install -d -m 0700 -o "$(id -u)" -g "$(id -g)" "$etc" "$keys" "$keys/privacy" "$keys/privacy/keys" "$keys/signing"
secret keyring > "$keys/privacy/keys/keyring.json"
secret counters-key > "$keys/privacy/keys/counters-signing.pem"
if [ "$role" = journal ] || [ "$role" = head ]; then
  secret signing-key > "$keys/signing/manifest-signing.pem"
fi
{
  printf 'SERVE_JOURNAL_KEK=%s\n' "$(secret kek)"
  printf 'SERVE_JOURNAL_VAULT_URL=%s\n' "$(secret vault-url)"
  printf 'SERVE_JOURNAL_PRIVACY_DIR=%s\n' "$keys/privacy"
} > "$etc/env"
echo "serve-journal keys for role $role in $keys (secrets in $etc/env, 0600)"
