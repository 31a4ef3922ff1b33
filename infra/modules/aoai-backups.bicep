// Spillover (issue 14) for one Function App: its backup AOAI resources, in the order given
// (main.bicep passes the other resources of the set from the next one after the app's own,
// wrapping). Deployed in the main resource group; reads each account where it lives.
//   - hostNames: the backups' endpoint hosts, for AOAI_BACKUPS;
//   - keySecretUris: key mode, the versionless URIs of the Key Vault secrets that already hold
//     the backups' keys (aoai-outapikey-<index>), for AOAI_BACKUP_OUTAPIKEY_SECRET_URIS.
// Keyless access to the backups is granted in main.bicep (aoaiBackupAccess).

@description('The backup AOAI accounts, in order: [{ name, resourceGroup, subscriptionId? }].')
param backups array

@description('Index of each backup in aoaiResources, in the same order (names its key secret).')
param backupIndexes array

@description('Key secret URI up to the index: https://<vault>/secrets/aoai-outapikey-')
param keySecretUriPrefix string

resource accounts 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = [for b in backups: {
  name: b.name
  scope: resourceGroup(b.?subscriptionId ?? subscription().subscriptionId, b.resourceGroup)
}]

// `name.openai.azure.com` (the endpoint without scheme and slash), as AOAI_HOSTNAME is written.
output hostNames array = [for (b, k) in backups: replace(replace(accounts[k].properties.endpoint, 'https://', ''), '/', '')]

output keySecretUris array = [for j in backupIndexes: '${keySecretUriPrefix}${j}']
