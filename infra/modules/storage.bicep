// Host storage for the Function Apps (AzureWebJobsStorage, identity-based) and the containers the
// deployment package is published to: on Elastic Premium one container (WEBSITE_RUN_FROM_PACKAGE =
// blob URL, read with the apps' managed identities), on Flex Consumption one per app
// (functionAppConfig.deployment.storage). No shared keys: this is why the apps run without an Azure Files content
// share (Azure Files only supports connection strings).

@description('Storage account name (3-24 lowercase letters and digits), computed in main.bicep.')
param name string

param location string
param tags object = {}
param privateEndpointSubnetId string

@description('Private DNS zone IDs for blob, queue and table, in that order.')
param privateDnsZoneIds array

@description('Public IP ranges (CIDR) allowed to upload packages; empty keeps public access off and publishing must run from inside the network.')
param deployerIpRanges array

@description('Blob container holding the deployment package.')
param packageContainerName string

@description('Flex Consumption: one deployment container per app (func / VS Code publish into it); empty on Elastic Premium.')
param deploymentContainerNames array

var groups = [
  'blob'
  'queue'
  'table'
]

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  //checkov:skip=CKV_AZURE_43:The name comes from main.bicep as 'st' + prefix + uniqueString(), hyphens removed, lowercased, cut to 24: always valid. checkov renders this cross-module value nondeterministically and fails about one run in six.
  //checkov:skip=CKV_AZURE_59:Public network access is enabled only when deployerIpRanges lists publisher IPs, and then behind defaultAction Deny with those IP rules.
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_GZRS'
  }
  properties: {
    accessTier: 'Hot'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowCrossTenantReplication: false
    publicNetworkAccess: empty(deployerIpRanges) ? 'Disabled' : 'Enabled'
    networkAcls: {
      defaultAction: 'Deny'
      bypass: 'AzureServices'
      // Storage rejects /31 and /32 prefixes: a single address must come bare, so a /32 is
      // stripped here (a /31 must be given as its two addresses; see deployerIpRanges).
      ipRules: [for ip in deployerIpRanges: {
        value: endsWith(ip, '/32') ? substring(ip, 0, length(ip) - 3) : ip
        action: 'Allow'
      }]
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
        }
        file: {
          enabled: true
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
        table: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource packages 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: packageContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource deploymentContainers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [for c in deploymentContainerNames: {
  parent: blobService
  name: c
  properties: {
    publicAccess: 'None'
  }
}]

module endpoints 'private-endpoint.bicep' = [for (g, i) in groups: {
  name: 'pe-${name}-${g}'
  params: {
    name: 'pe-${name}-${g}'
    location: location
    tags: tags
    subnetId: privateEndpointSubnetId
    privateLinkServiceId: account.id
    groupId: g
    privateDnsZoneIds: [
      privateDnsZoneIds[i]
    ]
  }
}]

output id string = account.id
output name string = account.name
output blobEndpoint string = account.properties.primaryEndpoints.blob
