#!/usr/bin/env bash
# Post-deployment smoke check: proves a deployed set end to end through the gateway and prints
# PASS/FAIL per item (health, chat, stream, content filter, unregistered user, abuse record),
# then "smoke: N passed, M failed". Exits non-zero when anything failed.
#
#   infra/smoke.sh --gateway https://aoai.contoso.com --key "$KEY" \
#     --deployment gpt-4o --user alice \
#     --records cosmos --cosmos-endpoint https://<account>.documents.azure.com:443/
#
# The record check reads the abuse log where the set keeps it (--records cosmos|file|command|none);
# see infra/smoke.py --help. For Cosmos DB it uses the signed-in operator's Entra token
# (az account get-access-token; the operator needs a Cosmos DB data-plane reader role and network
# reach to the account's private endpoint). CI runs this against the local set (scripts/e2e.sh)
# with --records file. Needs Python 3.9+ (standard library only) and, for cosmos, the Azure CLI.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
command -v "$python" >/dev/null || { echo "smoke.sh: $python is required" >&2; exit 2; }
exec "$python" "$here/smoke.py" "$@"
