// Azure AI Content Safety: custom subdomain (required for Entra ID tokens and private endpoints),
// keys off, public network access off, reached through a private endpoint.

param location string
param namePrefix string
param tags object = {}
param privateEndpointSubnetId string
param privateDnsZoneId string

var name = toLower('cs-${namePrefix}-${uniqueString(resourceGroup().id)}')

resource account 'Microsoft.CognitiveServices/accounts@2024-10-01' = {
  name: name
  location: location
  tags: tags
  kind: 'ContentSafety'
  sku: {
    name: 'S0'
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    customSubDomainName: name
    publicNetworkAccess: 'Disabled'
    disableLocalAuth: true
    networkAcls: {
      defaultAction: 'Deny'
      ipRules: []
      virtualNetworkRules: []
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
    privateLinkServiceId: account.id
    groupId: 'account'
    privateDnsZoneIds: [
      privateDnsZoneId
    ]
  }
}

output id string = account.id
output name string = account.name
output endpoint string = account.properties.endpoint
