// Key Vault for the handler's secrets (referenced from app settings) and, optionally, the
// gateway's TLS certificate. RBAC authorization, soft delete and purge protection on; reached
// through a private endpoint.

param location string
param tags object = {}
param privateEndpointSubnetId string
param privateDnsZoneId string

@minValue(7)
@maxValue(90)
param softDeleteRetentionInDays int = 90

@description('Vault name (computed in main.bicep so secrets and references can name it up front).')
param name string

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: softDeleteRetentionInDays
    enablePurgeProtection: true
    // Private only. To import a certificate from outside the network, open it briefly
    // (infra/README.md shows the commands) or keep the certificate in another vault.
    publicNetworkAccess: 'Disabled'
    networkAcls: {
      defaultAction: 'Deny'
      bypass: 'AzureServices'
    }
  }
}

module endpoint 'private-endpoint.bicep' = {
  name: 'pe-${name}'
  params: {
    name: 'pe-${name}'
    location: location
    tags: tags
    subnetId: privateEndpointSubnetId
    privateLinkServiceId: vault.id
    groupId: 'vault'
    privateDnsZoneIds: [
      privateDnsZoneId
    ]
  }
}

output id string = vault.id
output name string = vault.name
output uri string = vault.properties.vaultUri
