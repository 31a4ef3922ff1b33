#!/usr/bin/env bash
# Build the handler package and publish it to every Function App of a deployment.
#
#   infra/publish.sh -g <resource-group> [-n <deployment-name>] [options]
#
#   -g, --resource-group RG   resource group the Bicep was deployed to (required)
#   -n, --deployment NAME     deployment whose outputs list the apps (default: main)
#   --skip-build              publish the existing dist/fwdproxy.zip as it is
#   --package-args "ARGS"     extra arguments for scripts/package.sh (e.g. "--musl")
#   --outputs-file FILE       read the deployment outputs from FILE (JSON, as printed by
#                             `az deployment group show --query properties.outputs`) instead of Azure
#   --dry-run                 print the az commands instead of running them
#
# Flex Consumption apps (hostingPlan output FlexConsumption, the default) take the package through
# their deployment endpoint, the way `func azure functionapp publish` and VS Code deploy: step 2
# becomes `func azure functionapp publish <app> --no-build --custom` from dist/package (or
# `az functionapp deployment source config-zip` when Core Tools are not installed), and step 3 is
# not needed (the platform restarts the app on the new package). The signed-in identity then
# needs "Website Contributor" on the apps and network reach to their SCM sites (deployerIpRanges,
# or publish from inside the network); see docs/deploy.md §7.
#
# Elastic Premium apps -- what it does, and why this way:
#   1. scripts/package.sh builds the Linux x86-64 `handler` and assembles dist/package/
#      (host.json, FwdProxy/function.json, executable handler) and dist/fwdproxy.zip -- the
#      layout `func azure functionapp publish --no-build` would upload.
#   2. Uploads the zip to the private blob the apps run from (WEBSITE_RUN_FROM_PACKAGE points at
#      <storage>/<packageContainerName>/<packageBlobName>), plus a copy named after the commit for
#      rollback. The apps read it with their managed identities: there is no storage key, and so
#      no Azure Files content share, which is what Kudu zip deploy and `func ... publish` write to
#      on Linux Premium -- and Kudu (SCM) is closed by the access restrictions anyway.
#   3. Restarts each app and syncs its triggers so the host loads the new package.
# The signed-in identity needs "Storage Blob Data Contributor" on the storage account and network
# reach to it (run from inside the VNet, or list your IP in deployerIpRanges), plus "Website
# Contributor" on the apps.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ZIP="$ROOT/dist/fwdproxy.zip"
PKG="$ROOT/dist/package"

RG=""
DEPLOYMENT="main"
BUILD=1
PACKAGE_ARGS=""
OUTPUTS_FILE=""
DRY_RUN=0

usage() { sed -n '2,34p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
say() { printf '==> %s\n' "$*"; }
die() { printf 'publish.sh: %s\n' "$*" >&2; exit 1; }
run() {
  if [[ "$DRY_RUN" -eq 1 ]]; then
    printf '+ %q' "$1"; shift; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -g|--resource-group) RG="${2:?$1 needs a value}"; shift ;;
    -n|--deployment) DEPLOYMENT="${2:?$1 needs a value}"; shift ;;
    --skip-build) BUILD=0 ;;
    --package-args) PACKAGE_ARGS="${2:?$1 needs a value}"; shift ;;
    --outputs-file) OUTPUTS_FILE="${2:?$1 needs a value}"; shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done
[[ -n "$RG" ]] || die "missing -g <resource-group> (see --help)"

# 1. Build and check the package layout the Functions host expects.
if [[ "$BUILD" -eq 1 ]]; then
  say "building the package (scripts/package.sh $PACKAGE_ARGS)"
  # shellcheck disable=SC2086 # word splitting of the extra arguments is intended
  "$ROOT/scripts/package.sh" $PACKAGE_ARGS
fi
[[ -f "$ZIP" ]] || die "$ZIP is missing (run scripts/package.sh)"
for f in host.json FwdProxy/function.json handler; do
  [[ -f "$PKG/$f" ]] || die "dist/package/$f is missing"
done
[[ -x "$PKG/handler" ]] || die "dist/package/handler is not executable"
if command -v file >/dev/null; then
  file "$PKG/handler" | grep -q 'x86-64' || die "dist/package/handler is not a Linux x86-64 binary"
fi

# 2. Where to publish: the deployment outputs.
if [[ -n "$OUTPUTS_FILE" ]]; then
  outputs="$(cat "$OUTPUTS_FILE")"
else
  command -v az >/dev/null || die "the Azure CLI (az) is required"
  outputs="$(az deployment group show -g "$RG" -n "$DEPLOYMENT" --query properties.outputs -o json)"
fi
field() {
  python3 -c 'import json,sys; o=json.loads(sys.argv[1]); v=o[sys.argv[2]]["value"]
print("\n".join(v) if isinstance(v, list) else v)' "$outputs" "$1"
}
plan="$(field hostingPlan 2>/dev/null || echo ElasticPremium)"
storage="$(field storageAccountName)"
container="$(field packageContainerName)"
blob="$(field packageBlobName)"
mapfile -t apps < <(field functionAppNames)
[[ ${#apps[@]} -gt 0 ]] || die "the deployment lists no Function Apps"

version="$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"

if [[ "$plan" == "FlexConsumption" ]]; then
  for app in "${apps[@]}"; do
    if command -v func >/dev/null; then
      say "publishing $version to $app (Flex Consumption, func)"
      (cd "$PKG" && run func azure functionapp publish "$app" --no-build --custom)
    else
      say "publishing $version to $app (Flex Consumption, az config-zip; func not installed)"
      run az functionapp deployment source config-zip -g "$RG" -n "$app" --src "$ZIP"
    fi
  done
  fqdn="$(field appGatewayFqdn 2>/dev/null || true)"
  say "published. Smoke test through the gateway (use your DNS name if the certificate is for it):"
  echo "  curl -fsS https://${fqdn:-<gateway-host>}/openai/deployments/health/check"
  exit 0
fi
say "publishing $version to ${#apps[@]} app(s) via $storage/$container/$blob"

run az storage blob upload --auth-mode login --account-name "$storage" \
  --container-name "$container" --name "$blob" --file "$ZIP" --overwrite true --only-show-errors
run az storage blob upload --auth-mode login --account-name "$storage" \
  --container-name "$container" --name "releases/fwdproxy-$stamp-$version.zip" --file "$ZIP" \
  --overwrite false --only-show-errors

# 3. Load it everywhere.
if [[ "$DRY_RUN" -eq 1 ]]; then
  sub='<subscription-id>'
else
  sub="$(az account show --query id -o tsv)"
fi
for app in "${apps[@]}"; do
  say "restarting $app"
  run az functionapp restart -g "$RG" -n "$app"
  run az rest --method post \
    --url "https://management.azure.com/subscriptions/$sub/resourceGroups/$RG/providers/Microsoft.Web/sites/$app/syncfunctiontriggers?api-version=2024-04-01"
done

fqdn="$(field appGatewayFqdn 2>/dev/null || true)"
say "published. Smoke test through the gateway (use your DNS name if the certificate is for it):"
echo "  curl -fsS https://${fqdn:-<gateway-host>}/openai/deployments/health/check"
